//! The audit trail's record and chain: what one answered job's record says (which model file
//! scored which rows, for whom, with what outcome), the digest of a job's rows, and the chain
//! that makes a removed, reordered or altered record visible. Each [`Chain`] numbers its records
//! `seq` 0, 1, 2, … and gives each the sha256 of the previous record's body; whoever appends to
//! it must publish the records in that order. A chain's first record names the last confirmed
//! record of the worker's chain before it, which [`ChainEnds`] keeps across broker sessions.
//! The stream the records go to is the transport's (`amqp::publisher`); nothing here names it. docs/AUDIT.md describes the record.

use std::sync::{Arc, Mutex, PoisonError};

use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::flow::{epoch_ms, epoch_ms_at, AuditedInputs, ErrorCode, JobMeta, Lane, Provenance, Rejected};
use crate::settings::AuditSettings;

/// A record that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the ok result of job {job_id} has no outputs member to record: {problem}")]
    NoOutputs { job_id: String, problem: String },
    #[error("cannot encode the audit record of job {job_id}: {problem}")]
    Encode { job_id: String, problem: String },
    /// A stage answered a job without what its record needs: a bug, reported rather than
    /// leaving a record with facts missing.
    #[error("job {job_id} reached the audit trail without its provenance (a worker bug); it returns to its queue")]
    Unaudited { job_id: String },
}

/// A job's id for a message: quoted, or `(no id)`.
pub fn shown(job_id: Option<&str>) -> String {
    job_id.map_or_else(|| "(no id)".to_string(), |id| format!("{id:?}"))
}

/// The digest (and, when `keep`, a copy) of a job's rows as scored: `values` row-major,
/// `features` values per row.
pub fn inputs(values: &[f32], features: usize, keep: bool) -> AuditedInputs {
    // The bytes go to the hash a block at a time: an update per 4-byte value adds a call and a
    // buffer copy per value to the hashing, a large part of the trail's cost on 100-row jobs.
    const BLOCK_VALUES: usize = 1024;
    let mut digest = Sha256::new();
    let mut block = [0u8; 4 * BLOCK_VALUES];
    for chunk in values.chunks(BLOCK_VALUES) {
        for (bytes, value) in block.chunks_exact_mut(4).zip(chunk) {
            bytes.copy_from_slice(&value.to_le_bytes());
        }
        digest.update(&block[..4 * chunk.len()]);
    }
    AuditedInputs { sha256: digest.finalize().into(), features, rows: keep.then(|| values.to_vec()) }
}

/// What the record of a job that reached a batcher says beyond its result; `None` with the trail
/// off (the job carries no audited inputs).
pub fn scored(job: &JobMeta, error_code: Option<ErrorCode>, batch_id: Option<u64>) -> Option<Box<Provenance>> {
    let inputs = job.audit.as_ref()?;
    Some(Box::new(Provenance {
        model: Some(job.model.name.clone()),
        version: Some(job.model.version),
        model_sha256: Some(job.model.sha256.clone()),
        inputs: Some(Arc::clone(inputs)),
        error_code,
        received_ms: epoch_ms_at(job.received_at),
        scored_ms: epoch_ms(),
        batch_id,
    }))
}

/// What the record of a job refused before it reached a batcher says beyond its result: no rows,
/// no model file, no run.
pub fn refused(rejected: &Rejected, received_at: std::time::Instant) -> Box<Provenance> {
    Box::new(Provenance {
        model: rejected.model.clone(),
        version: rejected.model_version,
        model_sha256: None,
        inputs: None,
        error_code: Some(rejected.reason.code()),
        received_ms: epoch_ms_at(received_at),
        scored_ms: epoch_ms(),
        batch_id: None,
    })
}

/// One answered job, as the transport saw it, with its [`Provenance`].
pub struct Answer<'a> {
    pub job_id: Option<&'a str>,
    /// The job message's `correlation_id`, `user_id` and `app_id` properties.
    pub correlation_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub app_id: Option<&'a str>,
    /// The queue the job came from, and its lane.
    pub queue: &'a str,
    pub lane: Lane,
    /// `ok`, `error` or `expired`.
    pub status: &'static str,
    /// The result body in plaintext.
    pub result: &'a [u8],
    /// The job came encrypted: its record holds digests only.
    pub encrypted: bool,
    pub provenance: &'a Provenance,
}

/// A record of a chain as the next chain's first record names it (`previous_chain`): the last
/// record of the worker's chain before, that the broker confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainEnd {
    pub chain_id: String,
    pub seq: u64,
    /// Hex sha256 of the record's body.
    pub sha256: String,
}

/// The last confirmed record of a worker process's chains, shared by its broker sessions: each
/// session's writer reports the records the broker confirmed, and the next session's chain
/// names the end. Confirms may be reported out of order; the end moves only over an unbroken run
/// of confirmed records, so every record of the chain up to it is stored.
#[derive(Debug, Clone, Default)]
pub struct ChainEnds(Arc<Mutex<Confirmed>>);

#[derive(Debug, Default)]
struct Confirmed {
    end: Option<ChainEnd>,
    /// Confirmed runs of the newest chain that do not join the end yet: first `seq`, last record.
    waiting: Vec<(u64, ChainEnd)>,
}

impl ChainEnds {
    /// The end the next chain names; `None` when none is known.
    pub fn last(&self) -> Option<ChainEnd> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).end.clone()
    }

    /// The end of an earlier process's chain, found in the stream: kept unless a session of this
    /// process has had records confirmed meanwhile.
    pub fn found(&self, end: ChainEnd) {
        let mut confirmed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if confirmed.end.is_none() && confirmed.waiting.is_empty() {
            confirmed.end = Some(end);
        }
    }

    /// The broker confirmed the records from `first_seq` to `last.seq` of `last.chain_id`.
    pub fn confirmed(&self, first_seq: u64, last: ChainEnd) {
        let mut confirmed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the newest chain moves on: an older one's session has ended.
        confirmed.waiting.retain(|(_, end)| end.chain_id == last.chain_id);
        confirmed.waiting.push((first_seq, last));
        loop {
            let known = confirmed.end.as_ref();
            let joins = |first: u64, end: &ChainEnd| match known {
                Some(known) if known.chain_id == end.chain_id => first == known.seq + 1,
                _ => first == 0,
            };
            let Some(at) = confirmed.waiting.iter().position(|(first, end)| joins(*first, end)) else {
                return;
            };
            let (_, end) = confirmed.waiting.swap_remove(at);
            confirmed.end = Some(end);
        }
    }
}

/// One worker process's chain of records for one broker session, and what records hold.
pub struct Chain {
    worker_id: Arc<str>,
    chain_id: String,
    next_seq: u64,
    previous: Option<[u8; 32]>,
    /// What the first record names as `previous_chain`.
    previous_chain: Option<ChainEnd>,
    include_outputs: bool,
    include_inputs: bool,
}

impl Chain {
    /// A new chain: a fresh `chain_id`, `seq` from 0, its first record naming `previous_chain`.
    pub fn start(settings: &AuditSettings, previous_chain: Option<ChainEnd>) -> Self {
        Chain {
            worker_id: Arc::from(settings.worker_id.as_str()),
            chain_id: uuid::Uuid::new_v4().to_string(),
            next_seq: 0,
            previous: None,
            previous_chain,
            include_outputs: settings.include_outputs,
            include_inputs: settings.include_inputs,
        }
    }

    pub fn id(&self) -> &str {
        &self.chain_id
    }

    /// The `seq` of the next record.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The last record appended, as a later chain would name it; `None` before the first.
    pub fn end(&self) -> Option<ChainEnd> {
        let sha256 = hex(self.previous?);
        Some(ChainEnd { chain_id: self.chain_id.clone(), seq: self.next_seq.checked_sub(1)?, sha256 })
    }

    /// The body of the record of `answer`, next in the chain. The chain moves on only when the
    /// record is written, so a record that fails leaves no gap.
    pub fn append(&mut self, answer: &Answer<'_>) -> Result<Vec<u8>, AuditError> {
        let provenance = answer.provenance;
        let job_id = || shown(answer.job_id);
        let outputs = match answer.status {
            "ok" => {
                Some(outputs_of(answer.result).map_err(|problem| AuditError::NoOutputs { job_id: job_id(), problem })?)
            }
            _ => None,
        };
        let inputs = provenance.inputs.as_deref();
        let shown_inputs = inputs.filter(|_| self.include_inputs && !answer.encrypted).and_then(|i| {
            let rows = i.rows.as_deref()?;
            Some(Rows { values: rows, features: i.features })
        });
        let record = Record {
            worker_id: &self.worker_id,
            chain_id: &self.chain_id,
            seq: self.next_seq,
            prev_sha256: self.previous.map(hex),
            previous_chain: self.previous_chain.as_ref().filter(|_| self.next_seq == 0),
            job_id: answer.job_id,
            correlation_id: answer.correlation_id,
            user_id: answer.user_id,
            app_id: answer.app_id,
            queue: answer.queue,
            lane: answer.lane.as_str(),
            model: provenance.model.as_deref(),
            version: provenance.version,
            model_sha256: provenance.model_sha256.as_deref(),
            inputs_sha256: inputs.map(|i| hex(i.sha256)),
            inputs: shown_inputs,
            outputs: outputs.filter(|_| self.include_outputs && !answer.encrypted),
            outputs_sha256: outputs.map(|o| hex(Sha256::digest(o.get().as_bytes()).into())),
            encrypted: answer.encrypted,
            status: answer.status,
            error_code: provenance.error_code.map(ErrorCode::as_str),
            received_ms: provenance.received_ms,
            scored_ms: provenance.scored_ms,
            batch_id: provenance.batch_id,
        };
        let body =
            serde_json::to_vec(&record).map_err(|e| AuditError::Encode { job_id: job_id(), problem: e.to_string() })?;
        self.previous = Some(Sha256::digest(&body).into());
        self.next_seq += 1;
        Ok(body)
    }
}

/// The `outputs` member of an ok result body, exactly as the body holds it.
fn outputs_of(result: &[u8]) -> Result<&RawValue, String> {
    #[derive(serde::Deserialize)]
    struct Outputs<'a> {
        #[serde(borrow)]
        outputs: &'a RawValue,
    }
    serde_json::from_slice::<Outputs>(result).map(|body| body.outputs).map_err(|e| e.to_string())
}

/// A sha256 in lowercase hex, as records show digests.
pub fn hex(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The body of an audit record: schemas/audit-record.schema.json. Absent facts are `null`, so
/// every record has the same members; `inputs` and `outputs` only where the settings keep them.
#[derive(Serialize)]
struct Record<'a> {
    worker_id: &'a str,
    chain_id: &'a str,
    seq: u64,
    prev_sha256: Option<String>,
    /// Only on `seq` 0, else `null`.
    previous_chain: Option<&'a ChainEnd>,
    job_id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    user_id: Option<&'a str>,
    app_id: Option<&'a str>,
    queue: &'a str,
    lane: &'static str,
    model: Option<&'a str>,
    version: Option<u64>,
    model_sha256: Option<&'a str>,
    inputs_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inputs: Option<Rows<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outputs: Option<&'a RawValue>,
    outputs_sha256: Option<String>,
    encrypted: bool,
    status: &'static str,
    error_code: Option<&'static str>,
    received_ms: u64,
    scored_ms: u64,
    batch_id: Option<u64>,
}

/// Row-major values as an array of rows.
struct Rows<'a> {
    values: &'a [f32],
    features: usize,
}

impl Serialize for Rows<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let rows = self.values.chunks(self.features.max(1));
        let mut seq = serializer.serialize_seq(Some(rows.len()))?;
        for row in rows {
            seq.serialize_element(row)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(include_outputs: bool, include_inputs: bool) -> AuditSettings {
        AuditSettings { include_outputs, include_inputs, worker_id: "w-1".into(), ..AuditSettings::default() }
    }

    fn answer<'a>(provenance: &'a Provenance, result: &'a [u8], encrypted: bool) -> Answer<'a> {
        Answer {
            job_id: Some("j-1"),
            correlation_id: Some("run-7"),
            user_id: Some("risk"),
            app_id: None,
            queue: "scoring.jobs",
            lane: Lane::Online,
            status: "ok",
            result,
            encrypted,
            provenance,
        }
    }

    fn provenance(keep: bool) -> Provenance {
        Provenance {
            model: Some("m".into()),
            version: Some(2),
            inputs: Some(Arc::new(inputs(&[1.0, -0.5, 3.25, 0.0], 2, keep))),
            ..Provenance::default()
        }
    }

    const RESULT: &[u8] = br#"{"job_id":"j-1","status":"ok","outputs":{"score":[0.25,0.75]},"rows":2}"#;

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).expect("a record is JSON")
    }

    #[test]
    fn the_inputs_digest_spans_rows_larger_than_one_block() {
        let values: Vec<f32> = (0..2_500).map(|i| i as f32 * 0.37 - 400.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(inputs(&values, 50, false).sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    }

    #[test]
    fn the_inputs_digest_is_the_rows_as_little_endian_float32() {
        let bytes: Vec<u8> = [1.0f32, -0.5, 3.25, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(inputs(&[1.0, -0.5, 3.25, 0.0], 2, false).sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    }

    #[test]
    fn each_record_names_the_previous_one_by_the_digest_of_its_body() {
        let provenance = provenance(false);
        let mut chain = Chain::start(&settings(true, false), None);
        let first = chain.append(&answer(&provenance, RESULT, false)).expect("appended");
        let second = chain.append(&answer(&provenance, RESULT, false)).expect("appended");
        let (first_json, second_json) = (json(&first), json(&second));
        assert_eq!((&first_json["seq"], &second_json["seq"]), (&0.into(), &1.into()));
        assert_eq!(first_json["prev_sha256"], serde_json::Value::Null);
        assert_eq!(second_json["prev_sha256"], format!("{:x}", Sha256::digest(&first)));
        assert_eq!(first_json["chain_id"], chain.id());
    }

    #[test]
    fn outputs_and_inputs_are_recorded_as_the_settings_say() {
        let kept = provenance(true);
        let mut chain = Chain::start(&settings(true, true), None);
        let record = json(&chain.append(&answer(&kept, RESULT, false)).expect("appended"));
        assert_eq!(record["outputs"], serde_json::json!({"score": [0.25, 0.75]}));
        assert_eq!(record["outputs_sha256"], format!("{:x}", Sha256::digest(br#"{"score":[0.25,0.75]}"#)));
        assert_eq!(record["inputs"], serde_json::json!([[1.0, -0.5], [3.25, 0.0]]));

        let mut chain = Chain::start(&settings(false, false), None);
        let record = json(&chain.append(&answer(&provenance(false), RESULT, false)).expect("appended"));
        assert!(record.get("outputs").is_none() && record.get("inputs").is_none(), "{record}");
        assert_eq!(record["outputs_sha256"], format!("{:x}", Sha256::digest(br#"{"score":[0.25,0.75]}"#)));
        assert!(record["inputs_sha256"].as_str().is_some_and(|d| d.len() == 64));
    }

    #[test]
    fn an_encrypted_jobs_record_holds_digests_only() {
        let kept = provenance(true);
        let mut chain = Chain::start(&settings(true, true), None);
        let record = json(&chain.append(&answer(&kept, RESULT, true)).expect("appended"));
        assert!(record.get("outputs").is_none() && record.get("inputs").is_none(), "{record}");
        assert_eq!(record["encrypted"], true);
        assert!(record["outputs_sha256"].is_string() && record["inputs_sha256"].is_string());
    }

    #[test]
    fn a_record_that_cannot_be_written_leaves_no_gap() {
        let provenance = provenance(false);
        let mut chain = Chain::start(&settings(true, false), None);
        assert!(chain.append(&answer(&provenance, b"{\"status\":\"ok\"}", false)).is_err());
        assert_eq!(json(&chain.append(&answer(&provenance, RESULT, false)).expect("appended"))["seq"], 0);
    }

    fn end(chain_id: &str, seq: u64) -> ChainEnd {
        ChainEnd { chain_id: chain_id.into(), seq, sha256: format!("{seq:064x}") }
    }

    #[test]
    fn the_first_record_names_the_previous_chain_and_the_others_null() {
        let provenance = provenance(false);
        let mut chain = Chain::start(&settings(true, false), Some(end("before", 41)));
        assert_eq!(chain.end(), None);
        let first = json(&chain.append(&answer(&provenance, RESULT, false)).expect("appended"));
        let named = serde_json::json!({"chain_id": "before", "seq": 41, "sha256": format!("{:064x}", 41)});
        assert_eq!(first["previous_chain"], named);
        let second = chain.append(&answer(&provenance, RESULT, false)).expect("appended");
        assert_eq!(json(&second)["previous_chain"], serde_json::Value::Null);
        let last = chain.end().expect("two records");
        assert_eq!((last.seq, last.sha256), (1, format!("{:x}", Sha256::digest(&second))));
        let mut unknown = Chain::start(&settings(true, false), None);
        let first = json(&unknown.append(&answer(&provenance, RESULT, false)).expect("appended"));
        assert!(first.get("previous_chain").is_some_and(serde_json::Value::is_null), "{first}");
    }

    #[test]
    fn the_confirmed_end_moves_only_over_unbroken_runs() {
        let ends = ChainEnds::default();
        ends.found(end("old", 9));
        assert_eq!(ends.last(), Some(end("old", 9)));
        // Records 4-7 confirmed before 0-3: the end waits for 0-3.
        ends.confirmed(4, end("new", 7));
        assert_eq!(ends.last(), Some(end("old", 9)));
        ends.confirmed(0, end("new", 3));
        assert_eq!(ends.last(), Some(end("new", 7)));
        // 8-9 refused, 10-12 stored: the end stays at 7.
        ends.confirmed(10, end("new", 12));
        assert_eq!(ends.last(), Some(end("new", 7)));
        // A later chain's first run moves it on; the earlier chain's waiting run is dropped.
        ends.confirmed(0, end("next", 2));
        assert_eq!(ends.last(), Some(end("next", 2)));
        ends.found(end("older", 1));
        assert_eq!(ends.last(), Some(end("next", 2)), "what a session confirmed wins over the stream's tail");
    }
}

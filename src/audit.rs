//! The audit trail's record and chain: what one answered job's record says (which model file
//! scored which rows, for whom, with what outcome), the digest of a job's rows, and the chain
//! that makes a removed, reordered or altered record visible. Each [`Chain`] numbers its records
//! `seq` 0, 1, 2, … and gives each the sha256 of the previous record's body; whoever appends to
//! it must publish the records in that order. The stream the records go to is the transport's
//! (`amqp::publisher`); nothing here names it. docs/AUDIT.md describes the record.

use std::sync::Arc;

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
    let mut digest = Sha256::new();
    for value in values {
        digest.update(value.to_le_bytes());
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

/// One worker process's chain of records for one broker session, and what records hold.
pub struct Chain {
    worker_id: Arc<str>,
    chain_id: String,
    next_seq: u64,
    previous: Option<[u8; 32]>,
    include_outputs: bool,
    include_inputs: bool,
}

impl Chain {
    /// A new chain: a fresh `chain_id`, `seq` from 0.
    pub fn start(settings: &AuditSettings) -> Self {
        Chain {
            worker_id: Arc::from(settings.worker_id.as_str()),
            chain_id: uuid::Uuid::new_v4().to_string(),
            next_seq: 0,
            previous: None,
            include_outputs: settings.include_outputs,
            include_inputs: settings.include_inputs,
        }
    }

    pub fn id(&self) -> &str {
        &self.chain_id
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

fn hex(bytes: [u8; 32]) -> String {
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
    fn the_inputs_digest_is_the_rows_as_little_endian_float32() {
        let bytes: Vec<u8> = [1.0f32, -0.5, 3.25, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(inputs(&[1.0, -0.5, 3.25, 0.0], 2, false).sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
    }

    #[test]
    fn each_record_names_the_previous_one_by_the_digest_of_its_body() {
        let provenance = provenance(false);
        let mut chain = Chain::start(&settings(true, false));
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
        let mut chain = Chain::start(&settings(true, true));
        let record = json(&chain.append(&answer(&kept, RESULT, false)).expect("appended"));
        assert_eq!(record["outputs"], serde_json::json!({"score": [0.25, 0.75]}));
        assert_eq!(record["outputs_sha256"], format!("{:x}", Sha256::digest(br#"{"score":[0.25,0.75]}"#)));
        assert_eq!(record["inputs"], serde_json::json!([[1.0, -0.5], [3.25, 0.0]]));

        let mut chain = Chain::start(&settings(false, false));
        let record = json(&chain.append(&answer(&provenance(false), RESULT, false)).expect("appended"));
        assert!(record.get("outputs").is_none() && record.get("inputs").is_none(), "{record}");
        assert_eq!(record["outputs_sha256"], format!("{:x}", Sha256::digest(br#"{"score":[0.25,0.75]}"#)));
        assert!(record["inputs_sha256"].as_str().is_some_and(|d| d.len() == 64));
    }

    #[test]
    fn an_encrypted_jobs_record_holds_digests_only() {
        let kept = provenance(true);
        let mut chain = Chain::start(&settings(true, true));
        let record = json(&chain.append(&answer(&kept, RESULT, true)).expect("appended"));
        assert!(record.get("outputs").is_none() && record.get("inputs").is_none(), "{record}");
        assert_eq!(record["encrypted"], true);
        assert!(record["outputs_sha256"].is_string() && record["inputs_sha256"].is_string());
    }

    #[test]
    fn a_record_that_cannot_be_written_leaves_no_gap() {
        let provenance = provenance(false);
        let mut chain = Chain::start(&settings(true, false));
        assert!(chain.append(&answer(&provenance, b"{\"status\":\"ok\"}", false)).is_err());
        assert_eq!(json(&chain.append(&answer(&provenance, RESULT, false)).expect("appended"))["seq"], 0);
    }
}

//! An audit record as a reader of the trail holds it: its bytes exactly as stored (the chain's
//! digests are over them), where it was found, and the members the commands filter, show and
//! check, read leniently so that a damaged record is reported rather than refused.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// One record as a source hands it over: its position and its bytes as stored, without the
/// newline that ends it in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// The stream offset of the message that holds it (records of one message share it).
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// The link of a chain's first record to the last confirmed record of the worker's chain
/// before it (`previous_chain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub chain_id: String,
    pub seq: u64,
    pub sha256: String,
}

/// What a record's `previous_chain` member says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreviousChain {
    /// No such member: a record written before records carried it.
    Absent,
    /// `null`: no previous chain is known.
    Unknown,
    Link(ChainLink),
    /// Neither `null` nor an object with `chain_id`, `seq` and `sha256`.
    Malformed,
}

/// The members of a record that the commands use, each `None` when absent, `null` or of
/// another type: whoever needs one reports its lack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub worker_id: Option<String>,
    pub chain_id: Option<String>,
    pub seq: Option<u64>,
    /// `Some(None)`: `null`; `None`: absent or not a string.
    pub prev_sha256: Option<Option<String>>,
    pub previous_chain: PreviousChain,
    pub job_id: Option<String>,
    pub user_id: Option<String>,
    pub model: Option<String>,
    pub version: Option<u64>,
    pub status: Option<String>,
    pub error_code: Option<String>,
    pub scored_ms: Option<u64>,
    pub inputs_sha256: Option<String>,
}

impl Fields {
    /// The members of `bytes`, or why none can be read (not JSON, not an object).
    pub fn read(bytes: &[u8]) -> Result<Fields, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
        let object = value.as_object().ok_or("not a JSON object")?;
        let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_string);
        let number = |key: &str| object.get(key).and_then(Value::as_u64);
        let prev_sha256 = match object.get("prev_sha256") {
            Some(Value::Null) => Some(None),
            Some(Value::String(digest)) => Some(Some(digest.clone())),
            _ => None,
        };
        Ok(Fields {
            worker_id: text("worker_id"),
            chain_id: text("chain_id"),
            seq: number("seq"),
            prev_sha256,
            previous_chain: previous_chain(object.get("previous_chain")),
            job_id: text("job_id"),
            user_id: text("user_id"),
            model: text("model"),
            version: number("version"),
            status: text("status"),
            error_code: text("error_code"),
            scored_ms: number("scored_ms"),
            inputs_sha256: text("inputs_sha256"),
        })
    }
}

fn previous_chain(member: Option<&Value>) -> PreviousChain {
    let link = match member {
        None => return PreviousChain::Absent,
        Some(Value::Null) => return PreviousChain::Unknown,
        Some(link) => link,
    };
    let chain_id = link.get("chain_id").and_then(Value::as_str);
    let seq = link.get("seq").and_then(Value::as_u64);
    let sha256 = link.get("sha256").and_then(Value::as_str);
    match (chain_id, seq, sha256) {
        (Some(chain_id), Some(seq), Some(sha256)) => {
            PreviousChain::Link(ChainLink { chain_id: chain_id.to_string(), seq, sha256: sha256.to_string() })
        }
        _ => PreviousChain::Malformed,
    }
}

/// Hex sha256 of a record's bytes: what the next record of its chain names as `prev_sha256`.
pub fn digest(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

//! The types every stage shares, and nothing else: a job's [`Origin`], a decoded [`Job`], the
//! [`Batch`] a batcher hands to a run, the [`ScoredBatch`] a run hands to the result stage, the
//! [`Outgoing`] result the publisher sends, and the typed [`Rejection`] of a job that cannot be
//! scored. It names no stage and no transport: a job carries its delivery as an opaque
//! [`Delivery`] that only the transport that made it can open, so every stage after decoding runs
//! on plain channels in tests.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::Charge;
use crate::engine::{Column, InferenceError, ModelVersion};
use crate::explain;
use crate::payload::PayloadKey;

/// Where a job came from: the online lane's rows are batched before the bulk lane's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Online,
    Bulk,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Online => "online",
            Lane::Bulk => "bulk",
        }
    }
}

/// The wire form of a job, which its result (ok or error) answers in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// `job_id`, `model`, `rows` or `records`; results with `status` and `outputs` by name.
    #[default]
    Native,
    /// Open Inference Protocol (KServe V2): `id`, `model_name`, `inputs` tensors; results with
    /// `outputs` tensors.
    OpenInference,
}

/// Error codes of the wire contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidInput,
    UnknownModel,
    TooLarge,
    Internal,
    /// The job's deadline passed before it could be scored.
    Expired,
    /// The worker refuses the job: the publisher may not score the model, or may not have results
    /// sent where the job asks; or its body cannot be decrypted, or it came in plaintext where
    /// encryption is required.
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::Expired => "expired",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

/// Why a job (or some of its rows) was not scored. The variant is the contract's error code; the
/// message names the problem and, where the sender can fix it, how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    UnknownModel(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    Forbidden(String),
}

impl Rejection {
    pub fn code(&self) -> ErrorCode {
        match self {
            Rejection::InvalidJson(_) => ErrorCode::InvalidJson,
            Rejection::InvalidInput(_) => ErrorCode::InvalidInput,
            Rejection::UnknownModel(_) => ErrorCode::UnknownModel,
            Rejection::TooLarge(_) => ErrorCode::TooLarge,
            Rejection::Internal(_) => ErrorCode::Internal,
            Rejection::Expired(_) => ErrorCode::Expired,
            Rejection::Forbidden(_) => ErrorCode::Forbidden,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Rejection::InvalidJson(m)
            | Rejection::InvalidInput(m)
            | Rejection::UnknownModel(m)
            | Rejection::TooLarge(m)
            | Rejection::Internal(m)
            | Rejection::Expired(m)
            | Rejection::Forbidden(m) => m,
        }
    }

    /// Expired jobs are answered but not dead-lettered: nothing is wrong with them.
    pub fn dead_letters(&self) -> bool {
        !matches!(self, Rejection::Expired(_))
    }

    /// The message for the log: what is wrong and where, without the job's values. The full
    /// message goes back to the publisher who sent them; see [`without_values`].
    pub fn without_values(&self) -> String {
        without_values(self.message())
    }
}

/// `message` with every literal in it replaced by `…`: quoted text (`"…"`, `` `…` ``) and
/// numbers, except positions: an index written `[3]`, and the number after `line`, `column`,
/// `offset` or `row`. Words stay (field, feature and model names, the kind of problem), so
/// `rows[0][3] = 1e39 is outside the float32 range` becomes `rows[0][3] = … is outside the
/// float32 range`. Applicant data in a job is values, so none of it survives; a message quoting a
/// value the worker did not foresee loses it all the same.
pub fn without_values(message: &str) -> String {
    const POSITION_WORDS: [&str; 4] = ["line ", "column ", "offset ", "row "];
    let chars: Vec<char> = message.chars().collect();
    let at = |i: usize| chars.get(i).copied();
    let digit_at = |i: usize| at(i).is_some_and(|c| c.is_ascii_digit());
    let mut out = String::with_capacity(message.len());
    let mut i = 0;
    while let Some(c) = at(i) {
        if c == '"' || c == '`' {
            let mut end = i + 1;
            while let Some(d) = at(end).filter(|&d| d != c) {
                end += if d == '\\' { 2 } else { 1 };
            }
            out.push(c);
            out.push('…');
            if end < chars.len() {
                out.push(c);
            }
            i = end + 1;
            continue;
        }
        // Part of a name: `float32`, `UTF-8`, `x-delivery-limit`.
        let word_char = |j: usize| at(j).is_some_and(|p| p.is_alphanumeric() || p == '_');
        let in_word = i > 0
            && (word_char(i - 1) || (at(i - 1) == Some('-') && i > 1 && at(i - 2).is_some_and(char::is_alphabetic)));
        let starts_number = c.is_ascii_digit() || (matches!(c, '-' | '+' | '.') && digit_at(i + 1));
        if in_word || !starts_number {
            out.push(c);
            i += 1;
            continue;
        }
        let mut end = i + 1;
        loop {
            match at(end) {
                Some(d) if d.is_ascii_digit() || d == '.' => end += 1,
                Some('e' | 'E') if digit_at(end + 1) => end += 2,
                Some('e' | 'E') if matches!(at(end + 1), Some('-' | '+')) && digit_at(end + 2) => end += 3,
                // Glued to letters (`2nd`, `0x1f`): still a literal, masked whole.
                Some(d) if d.is_alphanumeric() || d == '_' => end += 1,
                _ => break,
            }
        }
        let token: String = chars[i..end].iter().collect();
        let index = i > 0 && at(i - 1) == Some('[') && at(end) == Some(']');
        let position = POSITION_WORDS.iter().any(|word| out.ends_with(word));
        let whole = token.bytes().all(|b| b.is_ascii_digit());
        if whole && (index || position) {
            out.push_str(&token);
        } else {
            out.push('…');
        }
        i = end;
    }
    out
}

impl From<InferenceError> for Rejection {
    fn from(error: InferenceError) -> Self {
        Rejection::Internal(format!("inference failed: {error}"))
    }
}

/// A job that cannot be scored, with what is known about it for its error result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {reason}", reason.code().as_str())]
pub struct Rejected {
    pub job_id: Option<String>,
    pub model: Option<String>,
    pub model_version: Option<u64>,
    pub protocol: Protocol,
    /// The publisher the broker authenticated ([`Origin::publisher`]), when the job named one.
    pub publisher: Option<Arc<str>>,
    pub reason: Rejection,
}

impl Rejected {
    /// A job known by nothing but the reason it was refused.
    pub fn anonymous(reason: Rejection) -> Self {
        Self { job_id: None, model: None, model_version: None, protocol: Protocol::Native, publisher: None, reason }
    }
}

/// Who sent a job and where it asks its result to go, as the transport reported them, in plain
/// strings: what authorization judges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The user the publisher logged in to the broker as: the AMQP `user_id` property, which
    /// RabbitMQ refuses unless it names the publishing connection's user. `None` when the job
    /// has none.
    pub publisher: Option<Arc<str>>,
    /// The queue the job names in `reply_to`; `None` when it names none (the results queue).
    pub reply_to: Option<String>,
}

/// The transport's handle on one delivery: how to answer it, acknowledge it and dead-letter it.
/// Opaque to every stage but the transport that made it, which opens it with [`Delivery::open`].
#[derive(Clone)]
pub struct Delivery(Arc<dyn Any + Send + Sync>);

impl Delivery {
    pub fn new<T: Any + Send + Sync>(handle: T) -> Self {
        Self(Arc::new(handle))
    }

    /// The transport's own handle, or `None` when this delivery came from another transport.
    pub fn open<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Delivery")
    }
}

/// A validated job on its way to its batcher.
#[derive(Debug)]
pub struct Job {
    pub meta: Arc<JobMeta>,
    /// `meta.rows × n_features` values, row-major.
    pub inputs: Vec<f32>,
}

/// What every stage after decoding needs to know about a job.
#[derive(Debug)]
pub struct JobMeta {
    /// Unique per connection; keys the reassembly of split jobs.
    pub seq: u64,
    pub job_id: String,
    pub model: Arc<ModelVersion>,
    pub rows: usize,
    pub lane: Lane,
    pub received_at: Instant,
    /// How long the job waited in the broker (from its AMQP timestamp), for end-to-end latency.
    pub queued_for: Duration,
    /// Epoch milliseconds after which the job is answered `expired` instead of scored.
    pub deadline_ms: Option<u64>,
    /// The wire form the job came in; its result answers in the same form.
    pub protocol: Protocol,
    /// The authenticated publisher ([`Origin::publisher`]), named in the result.
    pub publisher: Option<Arc<str>>,
    pub delivery: Delivery,
    /// The job's rows in its lane's budget, returned when the job is answered.
    pub charge: Charge,
    /// Set when the job asked for explanations of its scores.
    pub explain: Option<explain::Request>,
    /// The key the job came encrypted with; its result is encrypted with it.
    pub key: Option<PayloadKey>,
    /// What the audit trail records of the job's rows; `None` with the trail off.
    pub audit: Option<Arc<AuditedInputs>>,
}

impl JobMeta {
    /// The rows the job sent, which its result answers: `rows` also counts the rows scored to
    /// explain them by sampling, which follow the job's own.
    pub fn answered_rows(&self) -> usize {
        self.explain.as_ref().map_or(self.rows, |request| request.rows)
    }
}

/// Why a batch stopped taking rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A session was free.
    Idle,
    /// The lane's `max_batch_rows` reached.
    Size,
    /// The oldest rows waited the lane's `max_delay_ms` for a busy engine.
    Delay,
    /// The jobs channel closed (shutdown or reconnect): flushing what is left.
    Drain,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Size => "size",
            CloseReason::Delay => "delay",
            CloseReason::Drain => "drain",
        }
    }
}

/// A contiguous run of one job's rows inside a batch.
#[derive(Debug, Clone)]
pub struct Segment {
    pub job: Arc<JobMeta>,
    /// First row of this segment within its job.
    pub job_offset: usize,
    /// First row of this segment within the batch.
    pub batch_offset: usize,
    pub rows: usize,
}

impl Segment {
    pub fn is_whole_job(&self) -> bool {
        self.job_offset == 0 && self.rows == self.job.rows
    }
}

/// Rows ready for one session run: row-major inputs and where each job's rows sit.
#[derive(Debug)]
pub struct Batch {
    pub inputs: Vec<f32>,
    pub rows: usize,
    pub segments: Vec<Segment>,
    pub closed_by: CloseReason,
}

/// The outcome of one run (or of jobs that expired before one), on its way to the result stage.
#[derive(Debug)]
pub struct ScoredBatch {
    /// The run that scored the batch, numbered per worker process; `None` for jobs answered
    /// without a run.
    pub batch_id: Option<u64>,
    pub segments: Vec<Segment>,
    pub outcome: Result<Vec<Column>, Rejection>,
    pub started_at: Instant,
    pub inference_time: Duration,
}

impl ScoredBatch {
    /// The batch's jobs, answered with `rejection` instead of scores.
    pub fn failed(segments: Vec<Segment>, rejection: Rejection) -> Self {
        ScoredBatch {
            batch_id: None,
            segments,
            outcome: Err(rejection),
            started_at: Instant::now(),
            inference_time: Duration::ZERO,
        }
    }
}

/// An encoded result on its way to the publisher, in plaintext.
#[derive(Debug)]
pub struct Outgoing {
    pub delivery: Delivery,
    pub job_id: Option<String>,
    pub body: Vec<u8>,
    /// Set for jobs that cannot be scored: the delivery goes to the dead-letter exchange.
    pub dead_letter: Option<Rejection>,
    /// What the job counts as once its result is confirmed.
    pub completion: Completion,
    /// The key the job came encrypted with: the publisher encrypts `body` with it. `None`: the
    /// result goes in plaintext, as its job came (or as a job that could not be decrypted is
    /// answered).
    pub key: Option<PayloadKey>,
    /// What the audit record says beyond the result; `None` with the trail off.
    pub audit: Option<Box<Provenance>>,
}

/// A job's rows as the audit trail records them, taken when the job is decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditedInputs {
    /// sha256 of the rows as scored: little-endian float32, row-major, in the model's feature order.
    pub sha256: [u8; 32],
    /// Values per row.
    pub features: usize,
    /// The rows themselves, kept only when records hold them (`audit.include_inputs`).
    pub rows: Option<Vec<f32>>,
}

/// What an audit record says of a job beyond its result body and its message: which model file
/// scored which rows, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Provenance {
    /// The model the job named (served or not) and the version that scored it, or was to.
    pub model: Option<String>,
    pub version: Option<u64>,
    /// The sha256 of the model file, once the job was bound to a served version.
    pub model_sha256: Option<String>,
    /// `None` for a job refused before its rows were read.
    pub inputs: Option<Arc<AuditedInputs>>,
    pub error_code: Option<ErrorCode>,
    /// Epoch milliseconds: the job received, and answered (scored or refused).
    pub received_ms: u64,
    pub scored_ms: u64,
    pub batch_id: Option<u64>,
}

/// A job's figures for `batchscore_jobs_completed_total` and its latency histogram, counted only
/// when its result is confirmed and the job acknowledged.
#[derive(Debug, Clone)]
pub struct Completion {
    /// A repository model name, or `telemetry::UNKNOWN_MODEL_LABEL`.
    pub model: String,
    pub lane: Lane,
    /// `ok`, `error` or `expired`.
    pub status: &'static str,
    pub rows: usize,
    /// When the job was published (or, without a timestamp, received): end-to-end latency.
    pub since: Instant,
}

impl Completion {
    /// When a job received at `received_at` after `queued_for` in the broker was published.
    pub fn published_at(received_at: Instant, queued_for: Duration) -> Instant {
        received_at.checked_sub(queued_for).unwrap_or(received_at)
    }
}

/// Now in epoch milliseconds, the unit of job deadlines.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// When `at` was, in epoch milliseconds.
pub fn epoch_ms_at(at: Instant) -> u64 {
    epoch_ms().saturating_sub(at.elapsed().as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::without_values;

    #[test]
    fn values_are_masked_and_positions_kept() {
        let cases = [
            ("rows[0][3] = 1234567890000 is outside the float32 range", "rows[0][3] = … is outside the float32 range"),
            (
                "inputs[1] (\"income\") data[7] = 1.23456789e305 is outside the float32 range (the model's input type)",
                "inputs[1] (\"…\") data[7] = … is outside the float32 range (the model's input type)",
            ),
            (
                "invalid type: string \"Jane Doe\", expected rows[2][0] to be a number at line 1 column 48",
                "invalid type: string \"…\", expected rows[2][0] to be a number at line 1 column 48",
            ),
            ("invalid value: integer `-5`, expected u64", "invalid value: integer `…`, expected u64"),
            ("id must be a string, found -12.5e-3", "id must be a string, found …"),
            ("row 3 has 5 values; model m2 expects 4", "row 3 has … values; model m2 expects …"),
            ("job body is not UTF-8 (invalid byte at offset 17)", "job body is not UTF-8 (invalid byte at offset 17)"),
            ("records[4].income_2 has a \"quote \\\" inside\"", "records[4].income_2 has a \"…\""),
            ("shape [3, 4] holds 0x1f and 2nd", "shape […, …] holds … and …"),
            ("unterminated \"quote", "unterminated \"…"),
        ];
        for (message, expected) in cases {
            assert_eq!(without_values(message), expected, "{message}");
        }
    }
}

//! Job decoding and validation: AMQP body and properties → a validated request, or a typed
//! [`JobError`] naming exactly what is wrong. Pure functions; no I/O.
//!
//! A job comes in one of two forms ([`Protocol`]): the native form (`rows` or `records`) or the
//! Open Inference Protocol form (`inputs` tensors, decoded in [`crate::oip`]). Both decode into
//! the same [`JobRequest`], and the form is kept so that the result answers in it.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::engine::ModelVersion;
use crate::oip::{self, InputsField, Tensor};
use crate::settings::LimitSettings;

pub const MAX_JOB_ID_CHARS: usize = 256;

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

/// A job that cannot be scored, with what is known about it for the error result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct JobError {
    pub job_id: Option<String>,
    pub model: Option<String>,
    pub model_version: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
    pub protocol: Protocol,
}

impl JobError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            job_id: None,
            model: None,
            model_version: None,
            code,
            message: message.into(),
            protocol: Protocol::Native,
        }
    }
}

/// What the broker handed over, as far as decoding is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub body: &'a [u8],
    pub message_id: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// The `x-model` header ([`oip::MODEL_HEADER`]): the model of an Open Inference Protocol job
    /// whose body names none.
    pub model_header: Option<&'a str>,
}

/// A decoded job, not yet checked against its model.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub job_id: String,
    pub model: String,
    pub model_version: Option<u64>,
    pub features: Features,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Features {
    /// Row-major values and the length of each row.
    Rows { values: Vec<f32>, widths: Vec<usize> },
    /// Named features, one list of (name, value) per record.
    Records(Vec<Vec<(String, f32)>>),
    /// Open Inference Protocol input tensors, all with the same rows: one `[rows, features]`
    /// tensor or one tensor per named feature.
    Tensors(Vec<Tensor>),
}

impl Features {
    pub fn row_count(&self) -> usize {
        match self {
            Features::Rows { widths, .. } => widths.len(),
            Features::Records(records) => records.len(),
            Features::Tensors(tensors) => tensors.first().map_or(0, Tensor::rows),
        }
    }
}

/// Parses and checks everything that does not depend on the model.
pub fn decode(envelope: Envelope<'_>, limits: &LimitSettings) -> Result<JobRequest, JobError> {
    let fallback_id = envelope.message_id.filter(|id| !id.is_empty()).map(str::to_string);
    let header_model = envelope.model_header.map(str::to_string);
    // Until the body is read, only the x-model header tells an Open Inference Protocol job.
    let with_id = |mut e: JobError| {
        e.job_id = e.job_id.or_else(|| fallback_id.clone());
        if header_model.is_some() {
            e.protocol = Protocol::OpenInference;
            e.model = e.model.or_else(|| header_model.clone());
        }
        e
    };
    if let Some(content_type) = envelope.content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.is_empty() && !essence.eq_ignore_ascii_case("application/json") {
            return Err(with_id(JobError::new(
                ErrorCode::InvalidInput,
                format!("content_type {content_type:?} is not supported; send application/json"),
            )));
        }
    }
    if envelope.body.len() > limits.max_job_bytes {
        return Err(with_id(JobError::new(
            ErrorCode::TooLarge,
            format!(
                "job body has {} bytes; the limit is {} (limits.max_job_bytes)",
                envelope.body.len(),
                limits.max_job_bytes
            ),
        )));
    }
    if let Err(e) = std::str::from_utf8(envelope.body) {
        return Err(with_id(JobError::new(
            ErrorCode::InvalidJson,
            format!("job body is not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
        )));
    }
    match envelope.body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => return Err(with_id(JobError::new(ErrorCode::InvalidJson, "job body is empty; send a JSON object"))),
        Some(_) => {
            return Err(with_id(JobError::new(
                ErrorCode::InvalidJson,
                format!("job body must be a JSON object, found {}", describe_json_start(envelope.body)),
            )))
        }
    }
    let body: JobBody = serde_json::from_slice(envelope.body).map_err(|e| {
        // serde_json reports numbers beyond f64 (1e400) as a syntax error; they are bad values.
        let code = match e.classify() {
            serde_json::error::Category::Data => ErrorCode::InvalidInput,
            _ if e.to_string().starts_with("number out of range") => ErrorCode::InvalidInput,
            _ => ErrorCode::InvalidJson,
        };
        let mut error = JobError::new(code, e.to_string());
        if code == ErrorCode::InvalidInput {
            (error.job_id, error.model, error.protocol) = identify(envelope.body, envelope.model_header.is_some());
        }
        with_id(error)
    })?;
    let protocol = if body.inputs.is_some() || envelope.model_header.is_some() {
        Protocol::OpenInference
    } else {
        Protocol::Native
    };
    let (id_field, job_id, model) = match protocol {
        Protocol::Native => ("job_id", body.job_id, body.model),
        Protocol::OpenInference => {
            let text = |field: &str, value: Option<serde_json::Value>| match value {
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                None => Ok(None),
                Some(other) => Err(with_id(JobError {
                    protocol,
                    ..JobError::new(ErrorCode::InvalidInput, format!("{field} must be a string, found {other}"))
                })),
            };
            ("id", text("id", body.id)?, text("model_name", body.model_name)?.or_else(|| header_model.clone()))
        }
    };
    let job_id = job_id.or(fallback_id).ok_or_else(|| JobError {
        protocol,
        ..JobError::new(
            ErrorCode::InvalidInput,
            format!("job has no {id_field} and the message has no message_id; set one of them"),
        )
    })?;
    let fail = |code, message: String| JobError {
        job_id: Some(job_id.clone()),
        model: model.clone(),
        model_version: body.model_version,
        code,
        message,
        protocol,
    };
    if job_id.is_empty() || job_id.chars().count() > MAX_JOB_ID_CHARS {
        return Err(fail(ErrorCode::InvalidInput, format!("{id_field} must have 1 to {MAX_JOB_ID_CHARS} characters")));
    }
    let Some(model) = model.clone() else {
        let message = match protocol {
            Protocol::Native => "job has no model; name the model to score with",
            Protocol::OpenInference => {
                "job has no model_name and the message has no x-model header; name the model to score with"
            }
        };
        return Err(fail(ErrorCode::InvalidInput, message.into()));
    };
    let native = body.rows.is_some() || body.records.is_some();
    let features = match (protocol, body.rows, body.records, body.inputs) {
        (Protocol::Native, Some(_), Some(_), _) => {
            return Err(fail(ErrorCode::InvalidInput, "job has both rows and records; send one of them".into()))
        }
        (Protocol::Native, None, None, _) => {
            return Err(fail(ErrorCode::InvalidInput, "job has neither rows nor records".into()))
        }
        (Protocol::Native, Some(rows), None, _) => Features::Rows { values: rows.values, widths: rows.widths },
        (Protocol::Native, None, Some(records), _) => Features::Records(records.0),
        (Protocol::OpenInference, ..) if native => {
            return Err(fail(
                ErrorCode::InvalidInput,
                "job has inputs or an x-model header (Open Inference Protocol) and also rows or records; send one \
                 form"
                    .into(),
            ))
        }
        (Protocol::OpenInference, _, _, None) => {
            return Err(fail(ErrorCode::InvalidInput, "job has no inputs; send at least one tensor".into()))
        }
        (Protocol::OpenInference, _, _, Some(inputs)) => {
            Features::Tensors(oip::tensors(inputs).map_err(|message| fail(ErrorCode::InvalidInput, message))?)
        }
    };
    match features.row_count() {
        0 => return Err(fail(ErrorCode::InvalidInput, "job has no rows; send at least one".into())),
        n if n > limits.max_rows_per_job => {
            return Err(fail(
                ErrorCode::TooLarge,
                format!("job has {n} rows; the limit is {} (limits.max_rows_per_job)", limits.max_rows_per_job),
            ))
        }
        _ => {}
    }
    Ok(JobRequest { job_id, model, model_version: body.model_version, features, protocol })
}

/// Lays the job's rows out as the model's input matrix (row-major, `rows × n_features`).
pub fn bind(features: Features, model: &ModelVersion) -> Result<Vec<f32>, String> {
    let expected = model.signature.n_features;
    match features {
        Features::Rows { values, widths } => {
            if let Some((row, width)) = widths.iter().enumerate().find(|(_, &w)| w != expected) {
                return Err(format!("row {row} has {width} values; model {} expects {expected}", model.name));
            }
            Ok(values)
        }
        Features::Records(records) => {
            let Some(names) = &model.feature_names else {
                return Err(format!(
                    "model {} has no feature names (config.yaml features); send rows instead of records",
                    model.name
                ));
            };
            // NaN marks "not given": decoded values are always finite, so it cannot be a real value.
            let mut matrix = vec![f32::NAN; records.len() * expected];
            for (i, record) in records.iter().enumerate() {
                let row = &mut matrix[i * expected..(i + 1) * expected];
                for (name, value) in record {
                    let Some(&column) = model.feature_index.get(name) else {
                        return Err(format!(
                            "records[{i}] has {name:?}, which is not a feature of model {}",
                            model.name
                        ));
                    };
                    row[column] = *value;
                }
                if let Some(missing) = row.iter().position(|v| v.is_nan()) {
                    return Err(format!("records[{i}] has no value for feature {:?}", names[missing]));
                }
            }
            Ok(matrix)
        }
        Features::Tensors(tensors) => oip::lay_out(tensors, model),
    }
}

#[derive(Deserialize)]
struct JobBody {
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default, deserialize_with = "version")]
    model_version: Option<u64>,
    #[serde(default)]
    rows: Option<RowsField>,
    #[serde(default)]
    records: Option<RecordsField>,
    // Open Inference Protocol members. `id` and `model_name` are read as any JSON value so that
    // a native job carrying them is decoded exactly as before; they are judged only in that form.
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    model_name: Option<serde_json::Value>,
    #[serde(default)]
    inputs: Option<InputsField>,
}

/// Best effort job id, model and form of a body that failed validation, for the error result;
/// `marked` when the message carries the x-model header.
fn identify(body: &[u8], marked: bool) -> (Option<String>, Option<String>, Protocol) {
    #[derive(Deserialize)]
    struct Ids {
        #[serde(default)]
        job_id: Option<serde_json::Value>,
        #[serde(default)]
        model: Option<serde_json::Value>,
        #[serde(default)]
        id: Option<serde_json::Value>,
        #[serde(default)]
        model_name: Option<serde_json::Value>,
        #[serde(default)]
        inputs: Option<de::IgnoredAny>,
    }
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    match serde_json::from_slice::<Ids>(body) {
        Ok(ids) if marked || ids.inputs.is_some() => (text(ids.id), text(ids.model_name), Protocol::OpenInference),
        Ok(ids) => (text(ids.job_id), text(ids.model), Protocol::Native),
        Err(_) => (None, None, Protocol::Native),
    }
}

fn describe_json_start(body: &[u8]) -> &'static str {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        Some(b'-' | b'0'..=b'9') => "a number",
        _ => "text that is not JSON",
    }
}

fn version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    struct VersionVisitor;
    impl Visitor<'_> for VersionVisitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("model_version as a positive integer or a string of digits, e.g. \"2\"")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v).map(Some).map_err(|_| E::custom(format!("model_version {v} is negative")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if v.fract() == 0.0 && v >= 0.0 && v < u64::MAX as f64 {
                Ok(Some(v as u64))
            } else {
                Err(E::custom(format!("model_version {v} is not a whole number")))
            }
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.parse()
                .map(Some)
                .map_err(|_| E::custom(format!("model_version {s:?} is not a version number (e.g. \"2\")")))
        }
    }
    deserializer.deserialize_any(VersionVisitor)
}

/// `rows` decoded straight into one flat f32 buffer.
struct RowsField {
    values: Vec<f32>,
    widths: Vec<usize>,
}

impl<'de> Deserialize<'de> for RowsField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowsVisitor;
        impl<'de> Visitor<'de> for RowsVisitor {
            type Value = RowsField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("rows as an array of arrays of numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RowsField, A::Error> {
                let mut rows = RowsField { values: Vec::new(), widths: Vec::new() };
                while let Some(width) =
                    seq.next_element_seed(RowSeed { row: rows.widths.len(), values: &mut rows.values })?
                {
                    rows.widths.push(width);
                }
                Ok(rows)
            }
        }
        deserializer.deserialize_seq(RowsVisitor)
    }
}

/// One row appended to the shared buffer; yields the row's length.
struct RowSeed<'a> {
    row: usize,
    values: &'a mut Vec<f32>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "rows[{}] to be an array of numbers", self.row)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut width = 0;
        while let Some(value) = seq.next_element_seed(NumberSeed { place: Place::Row(self.row, width) })? {
            self.values.push(value);
            width += 1;
        }
        Ok(width)
    }
}

/// Where a value sits, for error messages.
#[derive(Clone, Copy)]
enum Place<'a> {
    Row(usize, usize),
    Record(usize, &'a str),
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Place::Row(r, c) => write!(f, "rows[{r}][{c}]"),
            Place::Record(r, name) => write!(f, "records[{r}].{name}"),
        }
    }
}

/// A finite number within the float32 range, converted to f32.
struct NumberSeed<'a> {
    place: Place<'a>,
}

impl<'de> DeserializeSeed<'de> for NumberSeed<'_> {
    type Value = f32;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<f32, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NumberSeed<'_> {
    type Value = f32;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} to be a number", self.place)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f32, E> {
        let narrowed = v as f32;
        if !narrowed.is_finite() {
            return Err(E::custom(format!("{} = {v} is outside the float32 range", self.place)));
        }
        Ok(narrowed)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f32, E> {
        Ok(v as f32)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f32, E> {
        Ok(v as f32)
    }
}

/// `records` decoded as (name, value) lists.
struct RecordsField(Vec<Vec<(String, f32)>>);

impl<'de> Deserialize<'de> for RecordsField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RecordsVisitor;
        impl<'de> Visitor<'de> for RecordsVisitor {
            type Value = RecordsField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("records as an array of objects mapping feature names to numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RecordsField, A::Error> {
                let mut records = Vec::new();
                while let Some(record) = seq.next_element_seed(RecordSeed { index: records.len() })? {
                    records.push(record);
                }
                Ok(RecordsField(records))
            }
        }
        deserializer.deserialize_seq(RecordsVisitor)
    }
}

struct RecordSeed {
    index: usize,
}

impl<'de> DeserializeSeed<'de> for RecordSeed {
    type Value = Vec<(String, f32)>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed {
    type Value = Vec<(String, f32)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "records[{}] to be an object mapping feature names to numbers", self.index)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut record = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value_seed(NumberSeed { place: Place::Record(self.index, &name) })?;
            record.push((name, value));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitSettings {
        LimitSettings { max_rows_per_job: 3, max_job_bytes: 1000, ..Default::default() }
    }

    fn decode_str(body: &str) -> Result<JobRequest, JobError> {
        decode(Envelope { body: body.as_bytes(), message_id: None, content_type: None, model_header: None }, &limits())
    }

    #[test]
    fn rows_decode_into_one_flat_buffer() {
        let job = decode_str(r#"{"job_id":"a","model":"m","model_version":"2","rows":[[1,2.5],[3,-4e2]]}"#).unwrap();
        assert_eq!(job.model_version, Some(2));
        assert_eq!(job.features, Features::Rows { values: vec![1.0, 2.5, 3.0, -400.0], widths: vec![2, 2] });
    }

    #[test]
    fn job_id_falls_back_to_message_id() {
        let body = br#"{"model":"m","rows":[[1]]}"#;
        let envelope =
            Envelope { body, message_id: Some("mid"), content_type: Some("application/json"), model_header: None };
        let job = decode(envelope, &limits());
        assert_eq!(job.unwrap().job_id, "mid");
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_job_id() {
        let err = decode_str(r#"{"job_id":"a","model":"m","rows":[[1,"x"]]}"#).unwrap_err();
        assert_eq!((err.code, err.job_id.as_deref()), (ErrorCode::InvalidInput, Some("a")));
        assert!(err.message.contains("rows[0][1]"), "{}", err.message);

        let err = decode_str(r#"{"job_id":"a","model":"m","rows":[[1e39]]}"#).unwrap_err();
        assert!(err.message.contains("outside the float32 range"), "{}", err.message);

        let err = decode_str(r#"[1,2]"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidJson);
        assert!(err.message.contains("an array"), "{}", err.message);

        let err = decode_str(r#"{"job_id":"a","model":"m","rows":[[1],[2],[3],[4]]}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);

        let err = decode_str(r#"{"job_id":"a","model":"m","rows":[]}"#).unwrap_err();
        assert!(err.message.contains("no rows"), "{}", err.message);

        let envelope = Envelope { body: b"{\xff}", message_id: None, content_type: None, model_header: None };
        let err = decode(envelope, &limits()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidJson);
    }

    #[test]
    fn records_keep_names() {
        let job = decode_str(r#"{"job_id":"a","model":"m","records":[{"x":1,"y":2}]}"#).unwrap();
        assert_eq!(job.features, Features::Records(vec![vec![("x".into(), 1.0), ("y".into(), 2.0)]]));
    }
}

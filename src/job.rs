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
use crate::explain;
use crate::flow::{Protocol, Rejected, Rejection};
use crate::oip::{self, InputsField, Tensor};
use crate::settings::LimitSettings;

pub const MAX_JOB_ID_CHARS: usize = 256;

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
    /// The job asked for explanations (`"explain"`, or `parameters.explain` in the protocol form).
    pub explain: Option<ExplainAsk>,
}

/// A job's request for explanations; `top_k` overrides the model's number of reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplainAsk {
    pub top_k: Option<usize>,
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
pub fn decode(envelope: Envelope<'_>, limits: &LimitSettings) -> Result<JobRequest, Rejected> {
    let known = Known::from(&envelope);
    check_envelope(&envelope, limits).map_err(|reason| known.complete(Rejected::anonymous(reason)))?;
    let body = parse(envelope.body, envelope.model_header.is_some()).map_err(|error| known.complete(error))?;
    let protocol =
        if body.inputs.is_some() || known.model.is_some() { Protocol::OpenInference } else { Protocol::Native };
    let (id_field, job_id, model) = identify(protocol, body.job_id, body.model, body.id, body.model_name, &known)?;
    let rejected = |reason| Rejected {
        job_id: Some(job_id.clone()),
        model: model.clone(),
        model_version: body.model_version,
        protocol,
        publisher: None,
        reason,
    };
    if job_id.is_empty() || job_id.chars().count() > MAX_JOB_ID_CHARS {
        return Err(rejected(Rejection::InvalidInput(format!(
            "{id_field} must have 1 to {MAX_JOB_ID_CHARS} characters"
        ))));
    }
    let Some(model_name) = model.clone() else {
        return Err(rejected(Rejection::InvalidInput(
            match protocol {
                Protocol::Native => "job has no model; name the model to score with",
                Protocol::OpenInference => {
                    "job has no model_name and the message has no x-model header; name the model to score with"
                }
            }
            .into(),
        )));
    };
    let explain = match protocol {
        Protocol::Native => body.explain.map(ExplainField::ask),
        Protocol::OpenInference => body.parameters.as_ref().and_then(|p| p.get("explain")).map(|value| {
            ExplainField::deserialize(value)
                .map_err(|e| Rejection::InvalidInput(format!("parameters.explain: {e}")))
                .and_then(ExplainField::ask)
        }),
    };
    let explain = explain.transpose().map_err(rejected)?.flatten();
    let features = features(protocol, body.rows, body.records, body.inputs).map_err(rejected)?;
    check_row_count(&features, limits).map_err(rejected)?;
    Ok(JobRequest { job_id, model: model_name, model_version: body.model_version, features, protocol, explain })
}

/// The explanation request of a job whose `rows` rows are bound to `model` as `inputs`, when it
/// asked for one; `inputs` gains the rows that explaining them needs scored. An error when the
/// model cannot explain, or the rows to score would exceed `max_rows`.
pub fn explain(
    ask: Option<ExplainAsk>,
    model: &ModelVersion,
    inputs: &mut Vec<f32>,
    rows: usize,
    max_rows: usize,
) -> Result<Option<explain::Request>, Rejection> {
    let Some(ask) = ask else { return Ok(None) };
    let Some(explainer) = &model.explainer else {
        return Err(Rejection::InvalidInput(format!(
            "model {} version {} has no explain setting in its config.yaml, so its scores cannot be explained; \
             send the job without explain, or add an explain section (docs/EXPLANATIONS.md)",
            model.name, model.version
        )));
    };
    let top_k = ask.top_k.unwrap_or(explainer.top_k);
    let (request, extra) =
        explainer.request(inputs, rows, top_k, max_rows).map_err(|e| Rejection::TooLarge(e.to_string()))?;
    inputs.extend_from_slice(&extra);
    Ok(Some(request))
}

/// `"explain": true`, `false` or `{"top_k": N}`.
#[derive(Deserialize)]
#[serde(untagged, expecting = "explain to be true, false or {\"top_k\": N}")]
enum ExplainField {
    Flag(bool),
    Options(ExplainOptions),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainOptions {
    top_k: usize,
}

impl ExplainField {
    fn ask(self) -> Result<Option<ExplainAsk>, Rejection> {
        match self {
            ExplainField::Flag(false) => Ok(None),
            ExplainField::Flag(true) => Ok(Some(ExplainAsk { top_k: None })),
            ExplainField::Options(ExplainOptions { top_k: 0 }) => {
                Err(Rejection::InvalidInput("explain.top_k must be at least 1".into()))
            }
            ExplainField::Options(ExplainOptions { top_k }) => Ok(Some(ExplainAsk { top_k: Some(top_k) })),
        }
    }
}

/// What the message tells about a job before its body is read, for the error result of a body
/// that cannot be read.
struct Known {
    message_id: Option<String>,
    /// The `x-model` header: it also marks an Open Inference Protocol job.
    model: Option<String>,
}

impl Known {
    fn from(envelope: &Envelope<'_>) -> Self {
        Self {
            message_id: envelope.message_id.filter(|id| !id.is_empty()).map(str::to_string),
            model: envelope.model_header.map(str::to_string),
        }
    }

    /// Fills in what `error` does not know from the message.
    fn complete(&self, mut error: Rejected) -> Rejected {
        error.job_id = error.job_id.or_else(|| self.message_id.clone());
        if self.model.is_some() {
            error.protocol = Protocol::OpenInference;
            error.model = error.model.or_else(|| self.model.clone());
        }
        error
    }
}

/// Content type, size, encoding and shape of the body, before it is parsed.
fn check_envelope(envelope: &Envelope<'_>, limits: &LimitSettings) -> Result<(), Rejection> {
    if let Some(content_type) = envelope.content_type {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.is_empty() && !essence.eq_ignore_ascii_case("application/json") {
            return Err(Rejection::InvalidInput(format!(
                "content_type {content_type:?} is not supported; send application/json"
            )));
        }
    }
    let body = envelope.body;
    if body.len() > limits.max_job_bytes {
        return Err(Rejection::TooLarge(format!(
            "job body has {} bytes; the limit is {} (limits.max_job_bytes)",
            body.len(),
            limits.max_job_bytes
        )));
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(Rejection::InvalidJson(format!(
            "job body is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        None => Err(Rejection::InvalidJson("job body is empty; send a JSON object".into())),
        Some(_) => {
            Err(Rejection::InvalidJson(format!("job body must be a JSON object, found {}", describe_json_start(body))))
        }
    }
}

/// The body as JSON; a value of the wrong kind is `invalid_input`, with the job's id and model
/// where they can still be read.
fn parse(body: &[u8], marked: bool) -> Result<JobBody, Rejected> {
    serde_json::from_slice(body).map_err(|e| {
        // serde_json reports numbers beyond f64 (1e400) as a syntax error; they are bad values.
        let bad_value =
            e.classify() == serde_json::error::Category::Data || e.to_string().starts_with("number out of range");
        if !bad_value {
            return Rejected::anonymous(Rejection::InvalidJson(format!("{INVALID_JSON_PREFIX}{e}")));
        }
        let (job_id, model, protocol) = identify_unreadable(body, marked);
        let reason = Rejection::InvalidInput(e.to_string());
        Rejected { job_id, model, model_version: None, protocol, publisher: None, reason }
    })
}

/// How an `invalid_json` message about a body that is not JSON starts.
pub const INVALID_JSON_PREFIX: &str = "body is not valid JSON: ";

/// The job's id field name, id and model, each from the body or else the message.
fn identify(
    protocol: Protocol,
    job_id: Option<String>,
    model: Option<String>,
    id: Option<serde_json::Value>,
    model_name: Option<serde_json::Value>,
    known: &Known,
) -> Result<(&'static str, String, Option<String>), Rejected> {
    let (id_field, job_id, model) = match protocol {
        Protocol::Native => ("job_id", job_id, model),
        Protocol::OpenInference => {
            let text = |field: &str, value: Option<serde_json::Value>| match value {
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                None => Ok(None),
                Some(other) => Err(known.complete(Rejected {
                    protocol,
                    ..Rejected::anonymous(Rejection::InvalidInput(format!("{field} must be a string, found {other}")))
                })),
            };
            ("id", text("id", id)?, text("model_name", model_name)?.or_else(|| known.model.clone()))
        }
    };
    let job_id = job_id.or_else(|| known.message_id.clone()).ok_or_else(|| Rejected {
        protocol,
        ..Rejected::anonymous(Rejection::InvalidInput(format!(
            "job has no {id_field} and the message has no message_id; set one of them"
        )))
    })?;
    Ok((id_field, job_id, model))
}

/// The job's features in the one form it sent.
fn features(
    protocol: Protocol,
    rows: Option<RowsField>,
    records: Option<RecordsField>,
    inputs: Option<InputsField>,
) -> Result<Features, Rejection> {
    let invalid = |message: &str| Err(Rejection::InvalidInput(message.into()));
    match (protocol, rows, records, inputs) {
        (Protocol::Native, Some(_), Some(_), _) => invalid("job has both rows and records; send one of them"),
        (Protocol::Native, None, None, _) => invalid("job has neither rows nor records"),
        (Protocol::Native, Some(rows), None, _) => Ok(Features::Rows { values: rows.values, widths: rows.widths }),
        (Protocol::Native, None, Some(records), _) => Ok(Features::Records(records.0)),
        (Protocol::OpenInference, Some(_), ..) | (Protocol::OpenInference, _, Some(_), _) => invalid(
            "job has inputs or an x-model header (Open Inference Protocol) and also rows or records; send one form",
        ),
        (Protocol::OpenInference, _, _, None) => invalid("job has no inputs; send at least one tensor"),
        (Protocol::OpenInference, _, _, Some(inputs)) => Ok(Features::Tensors(oip::tensors(inputs)?)),
    }
}

fn check_row_count(features: &Features, limits: &LimitSettings) -> Result<(), Rejection> {
    match features.row_count() {
        0 => Err(Rejection::InvalidInput("job has no rows; send at least one".into())),
        n if n > limits.max_rows_per_job => Err(Rejection::TooLarge(format!(
            "job has {n} rows; the limit is {} (limits.max_rows_per_job)",
            limits.max_rows_per_job
        ))),
        _ => Ok(()),
    }
}

/// Lays the job's rows out as the model's input matrix (row-major, `rows × n_features`).
pub fn bind(features: Features, model: &ModelVersion) -> Result<Vec<f32>, Rejection> {
    let expected = model.signature.n_features;
    let invalid = |message: String| Err(Rejection::InvalidInput(message));
    match features {
        Features::Rows { values, widths } => {
            if let Some((row, width)) = widths.iter().enumerate().find(|(_, &w)| w != expected) {
                return invalid(format!("row {row} has {width} values; model {} expects {expected}", model.name));
            }
            Ok(values)
        }
        Features::Records(records) => {
            let Some(names) = &model.feature_names else {
                return invalid(format!(
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
                        return invalid(format!(
                            "records[{i}] has {name:?}, which is not a feature of model {}",
                            model.name
                        ));
                    };
                    row[column] = *value;
                }
                if let Some(missing) = row.iter().position(|v| v.is_nan()) {
                    return invalid(format!("records[{i}] has no value for feature {:?}", names[missing]));
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
    #[serde(default)]
    explain: Option<ExplainField>,
    /// Open Inference Protocol request parameters; only `explain` is read.
    #[serde(default)]
    parameters: Option<serde_json::Value>,
}

/// Best effort job id, model and form of a body that failed validation, for the error result;
/// `marked` when the message carries the x-model header.
fn identify_unreadable(body: &[u8], marked: bool) -> (Option<String>, Option<String>, Protocol) {
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
    use crate::flow::ErrorCode;

    fn limits() -> LimitSettings {
        LimitSettings { max_rows_per_job: 3, max_job_bytes: 1000, ..Default::default() }
    }

    fn decode_str(body: &str) -> Result<JobRequest, Rejected> {
        decode(Envelope { body: body.as_bytes(), message_id: None, content_type: None, model_header: None }, &limits())
    }

    #[test]
    fn rows_decode_into_one_flat_buffer() {
        let job = decode_str(r#"{"job_id":"a","model":"m","model_version":"2","rows":[[1,2.5],[3,-4e2]]}"#).unwrap();
        assert_eq!(job.model_version, Some(2));
        assert_eq!(job.features, Features::Rows { values: vec![1.0, 2.5, 3.0, -400.0], widths: vec![2, 2] });
    }

    #[test]
    fn explain_is_asked_in_the_jobs_own_form() {
        let ask = |body: &str| decode_str(body).map(|job| job.explain);
        let native = |explain: &str| ask(&format!(r#"{{"job_id":"a","model":"m","rows":[[1]],"explain":{explain}}}"#));
        assert_eq!(native("true").unwrap(), Some(ExplainAsk { top_k: None }));
        assert_eq!(native("false").unwrap(), None);
        assert_eq!(native(r#"{"top_k":2}"#).unwrap(), Some(ExplainAsk { top_k: Some(2) }));
        let zero = native(r#"{"top_k":0}"#).unwrap_err();
        assert!(zero.reason.message().contains("explain.top_k"), "{zero}");
        let word = native(r#""yes""#).unwrap_err();
        assert_eq!(word.reason.code(), ErrorCode::InvalidInput, "{word}");
        assert!(word.reason.message().contains(r#"explain to be true, false or {"top_k": N}"#), "{word}");

        let tensor = r#""inputs":[{"name":"x","shape":[1,1],"datatype":"FP32","data":[1]}]"#;
        let protocol =
            |parameters: &str| ask(&format!(r#"{{"id":"a","model_name":"m",{tensor},"parameters":{parameters}}}"#));
        assert_eq!(protocol(r#"{"explain":true}"#).unwrap(), Some(ExplainAsk { top_k: None }));
        assert_eq!(protocol(r#"{"other":1}"#).unwrap(), None);
        let bad = protocol(r#"{"explain":"yes"}"#).unwrap_err();
        assert!(bad.reason.message().starts_with("parameters.explain:"), "{bad}");
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
        assert_eq!((err.reason.code(), err.job_id.as_deref()), (ErrorCode::InvalidInput, Some("a")));
        assert!(err.reason.message().contains("rows[0][1]"), "{}", err.reason);

        let err = decode_str(r#"{"job_id":"a","model":"m","rows":[[1e39]]}"#).unwrap_err();
        assert!(err.reason.message().contains("outside the float32 range"), "{}", err.reason);

        let err = decode_str(r#"[1,2]"#).unwrap_err();
        assert_eq!(err.reason.code(), ErrorCode::InvalidJson);
        assert!(err.reason.message().contains("an array"), "{}", err.reason);

        let err = decode_str(r#"{"job_id":"a","model":"m","rows":[[1],[2],[3],[4]]}"#).unwrap_err();
        assert_eq!(err.reason.code(), ErrorCode::TooLarge);

        let err = decode_str(r#"{"job_id":"a","model":"m","rows":[]}"#).unwrap_err();
        assert!(err.reason.message().contains("no rows"), "{}", err.reason);

        let envelope = Envelope { body: b"{\xff}", message_id: None, content_type: None, model_header: None };
        let err = decode(envelope, &limits()).unwrap_err();
        assert_eq!(err.reason.code(), ErrorCode::InvalidJson);
    }

    #[test]
    fn records_keep_names() {
        let job = decode_str(r#"{"job_id":"a","model":"m","records":[{"x":1,"y":2}]}"#).unwrap();
        assert_eq!(job.features, Features::Records(vec![vec![("x".into(), 1.0), ("y".into(), 2.0)]]));
    }
}

#[cfg(test)]
mod open_inference_tests {
    use super::*;
    use crate::flow::ErrorCode;

    fn decode_with(body: &str, message_id: Option<&str>, model_header: Option<&str>) -> Result<JobRequest, Rejected> {
        let limits = LimitSettings { max_rows_per_job: 3, max_job_bytes: 10_000, ..Default::default() };
        decode(Envelope { body: body.as_bytes(), message_id, content_type: None, model_header }, &limits)
    }

    fn decode_str(body: &str) -> Result<JobRequest, Rejected> {
        decode_with(body, None, None)
    }

    fn input(datatype: &str, shape: &str, data: &str) -> String {
        let tensor = format!(r#"{{"name":"x","shape":{shape},"datatype":"{datatype}","data":{data}}}"#);
        format!(r#"{{"id":"a","model_name":"m","inputs":[{tensor}]}}"#)
    }

    fn tensors(job: JobRequest) -> Vec<Tensor> {
        match job.features {
            Features::Tensors(tensors) => tensors,
            other => panic!("expected tensors, got {other:?}"),
        }
    }

    fn message(body: &str) -> String {
        let error = decode_str(body).unwrap_err();
        assert_eq!(error.protocol, Protocol::OpenInference, "{error:?}");
        error.reason.message().to_string()
    }

    #[test]
    fn one_tensor_decodes_flat_or_nested() {
        let body = r#"{"id":"a","model_name":"m","model_version":"2","parameters":{"p":1},
            "inputs":[{"name":"x","shape":[2,3],"datatype":"FP32","parameters":{},"data":[1,2,3,4,5,6.5]}]}"#;
        let job = decode_str(body).unwrap();
        assert_eq!((job.job_id.as_str(), job.model.as_str(), job.model_version), ("a", "m", Some(2)));
        assert_eq!(job.protocol, Protocol::OpenInference);
        assert_eq!(job.features.row_count(), 2);
        let flat = tensors(job);
        assert_eq!(flat, vec![Tensor { name: "x".into(), shape: vec![2, 3], values: vec![1., 2., 3., 4., 5., 6.5] }]);
        let nested = tensors(decode_str(&input("FP32", "[2,3]", "[[1,2,3],[4,5,6.5]]")).unwrap());
        assert_eq!(nested[0].values, flat[0].values);
    }

    #[test]
    fn integer_and_double_datatypes_convert_to_f32() {
        for datatype in ["INT32", "INT64", "FP64", "fp64"] {
            let job = decode_str(&input(datatype, "[1,2]", "[3, -4]")).unwrap();
            assert_eq!(tensors(job)[0].values, vec![3.0, -4.0], "{datatype}");
        }
        let job = decode_str(&input("FP64", "[1,1]", "[0.1]")).unwrap();
        assert_eq!(tensors(job)[0].values, vec![0.1f32]);
    }

    #[test]
    fn unsupported_datatypes_and_bad_values_are_named() {
        let text = message(&input("BYTES", "[1,1]", r#"["a"]"#));
        assert!(text.contains(r#"datatype "BYTES"; batchscore accepts FP32, FP64, INT32 or INT64"#), "{text}");
        let text = message(&input("BOOL", "[1,1]", "[true]"));
        assert!(text.contains(r#"datatype "BOOL""#), "{text}");
        let text = message(&input("FP32", "[1,2]", r#"[1,"2"]"#));
        assert!(text.contains(r#"inputs[0] ("x") data[1] is a string, not a number"#), "{text}");
        let text = message(&input("INT64", "[1,2]", "[1,1.5]"));
        assert!(text.contains("has datatype INT64 but data[1] = 1.5 is not an integer"), "{text}");
        let text = message(&input("FP64", "[1,1]", "[1e39]"));
        assert!(text.contains("data[0] = 1e39 is outside the float32 range"), "{text}");
        let text = message(r#"{"id":"a","model_name":"m","inputs":[{"name":"x","shape":[1,1],"data":[1]}]}"#);
        assert!(text.contains("has no datatype"), "{text}");
        let text = message(r#"{"id":"a","model_name":"m","inputs":[{"shape":[1,1],"datatype":"FP32","data":[1]}]}"#);
        assert!(text.contains("inputs[0] has no name"), "{text}");
    }

    #[test]
    fn shapes_must_hold_the_data_and_inputs_agree_on_rows() {
        let text = message(&input("FP32", "[2,2]", "[1,2,3]"));
        assert!(text.contains("has shape [2, 2], which holds 4 values, but data has 3"), "{text}");
        let text = message(&input("FP32", "[1,1,1]", "[1]"));
        assert!(text.contains("has shape [1, 1, 1]; inputs have shape [rows, columns]"), "{text}");
        let text = message(&input("FP32", "[]", "[]"));
        assert!(text.contains("has shape []"), "{text}");
        let two = |second: &str| {
            format!(
                r#"{{"id":"a","model_name":"m","inputs":[{{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}},
                {second}]}}"#
            )
        };
        let text = message(&two(r#"{"name":"y","shape":[1],"datatype":"FP32","data":[1]}"#));
        assert!(text.contains(r#"inputs[1] ("y") has 1 rows but inputs[0] ("x") has 2"#), "{text}");
        let text = message(&two(r#"{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}"#));
        assert!(text.contains(r#"two tensors named "x""#), "{text}");
        let text = message(r#"{"id":"a","model_name":"m","inputs":[]}"#);
        assert!(text.contains("job has no inputs"), "{text}");
        let text = message(&input("FP32", "[0,2]", "[]"));
        assert!(text.contains("no rows"), "{text}");
        let error = decode_str(&input("FP32", "[4,1]", "[1,2,3,4]")).unwrap_err();
        assert_eq!((error.reason.code(), error.protocol), (ErrorCode::TooLarge, Protocol::OpenInference));
    }

    #[test]
    fn model_and_id_come_from_the_message_when_the_body_has_none() {
        let body = r#"{"inputs":[{"name":"x","shape":[1,1],"datatype":"FP32","data":[1]}]}"#;
        let job = decode_with(body, Some("mid"), Some("linear")).unwrap();
        assert_eq!((job.job_id.as_str(), job.model.as_str()), ("mid", "linear"));
        let body =
            r#"{"id":"a","model_name":"mlp","inputs":[{"name":"x","shape":[1,1],"datatype":"FP32","data":[1]}]}"#;
        assert_eq!(decode_with(body, Some("mid"), Some("linear")).unwrap().model, "mlp", "the body wins");
        let error = decode_with(r#"{"id":"a","inputs":[]}"#, None, None).unwrap_err();
        assert!(error.reason.message().contains("no model_name and the message has no x-model header"), "{error:?}");
        let error = decode_with(r#"{"model_name":"m","inputs":[]}"#, None, None).unwrap_err();
        assert!(error.reason.message().contains("job has no id and the message has no message_id"), "{error:?}");
        assert_eq!(error.protocol, Protocol::OpenInference);
    }

    #[test]
    fn unreadable_bodies_answer_in_the_form_they_were_sent_in() {
        let error = decode_with("{not json", Some("mid"), Some("linear")).unwrap_err();
        assert_eq!((error.reason.code(), error.protocol), (ErrorCode::InvalidJson, Protocol::OpenInference));
        assert_eq!((error.job_id.as_deref(), error.model.as_deref()), (Some("mid"), Some("linear")));
        assert_eq!(decode_with("{not json", None, None).unwrap_err().protocol, Protocol::Native);

        let body = r#"{"id":"a","model_name":"m","inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[{}]}]}"#;
        let error = decode_str(body).unwrap_err();
        assert_eq!((error.reason.code(), error.protocol), (ErrorCode::InvalidInput, Protocol::OpenInference));
        assert_eq!((error.job_id.as_deref(), error.model.as_deref()), (Some("a"), Some("m")));
        assert!(
            error.reason.message().contains("inputs[0].data to be an array of numbers"),
            "{}",
            error.reason.message()
        );

        let text = message(r#"{"id":7,"model_name":"m","inputs":[]}"#);
        assert!(text.contains("id must be a string, found 7"), "{text}");
        let text = message(&input("FP32", "[1,1]", "[1]").replace(r#""id":"a""#, r#""model_version":"two""#));
        assert!(text.contains(r#"model_version "two" is not a version number"#), "{text}");
        let text = message(r#"{"id":"a","model_name":"m","rows":[[1]],"inputs":[]}"#);
        assert!(text.contains("also rows or records; send one form"), "{text}");
        let text = message(r#"{"id":"a","model_name":"m","inputs":{"x":[1]}}"#);
        assert!(text.contains("inputs as an array of tensors"), "{text}");
    }

    #[test]
    fn native_jobs_ignore_protocol_members_they_do_not_use() {
        let body = r#"{"job_id":"a","model":"m","id":5,"model_name":[1],"rows":[[1,2]]}"#;
        let job = decode_str(body).unwrap();
        assert_eq!((job.job_id.as_str(), job.model.as_str(), job.protocol), ("a", "m", Protocol::Native));
        let error = decode_str(r#"{"job_id":"a","model":"m","rows":[["x"]]}"#).unwrap_err();
        assert_eq!((error.protocol, error.job_id.as_deref()), (Protocol::Native, Some("a")));
    }
}

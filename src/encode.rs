//! Result encoding: one job's outcome → the result message body, in the form the job came in
//! (native, or the Open Inference Protocol response form). Pure functions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::ser::{self, SerializeMap, SerializeSeq, Serializer};
use serde::Serialize;

use crate::engine::outputs::ColumnData;
use crate::engine::Column;
use crate::explain::{Explainer, Explanation};
use crate::flow::{ErrorCode, JobMeta, Protocol, Rejected, Rejection};
use crate::telemetry;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    pub batching: f64,
    pub inference: f64,
    pub total: f64,
}

impl Timing {
    pub fn of(job: &JobMeta, last_batch_at: Instant, inference: Duration) -> Self {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let batching = last_batch_at.saturating_duration_since(job.received_at);
        telemetry::record_batch_wait(&job.model.name, batching);
        Timing { batching: ms(batching), inference: ms(inference), total: ms(job.received_at.elapsed()) }
    }
}

#[derive(Serialize)]
struct OkBody<'a> {
    job_id: &'a str,
    status: &'static str,
    model: &'a str,
    model_version: String,
    model_sha256: &'a str,
    rows: usize,
    outputs: Outputs<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    explanations: Option<Explained<'a>>,
    timing_ms: Timing,
    /// The broker user that published the job, when it set `user_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<&'a str>,
}

/// The job's rows of every published output, as `{"name": [per-row values], …}`.
struct Outputs<'a> {
    columns: &'a [Column],
    start: usize,
    rows: usize,
}

impl Serialize for Outputs<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.columns.len()))?;
        for column in self.columns {
            map.serialize_entry(&column.name, &column.view(self.start, self.rows))?;
        }
        map.end()
    }
}

/// The ok result of `job`, whose rows start at `start` in `columns`, with its rows' explanations
/// when it asked for them.
pub fn encode_ok(
    job: &Arc<JobMeta>,
    columns: &[Column],
    start: usize,
    timing: Timing,
    explanations: Option<&[Explanation]>,
) -> Result<Vec<u8>, Rejection> {
    let explained = Explained::of(job, explanations);
    let mut body = Vec::with_capacity(expected_size(job.answered_rows(), columns.len(), explained.as_ref()));
    let encoded = match job.protocol {
        Protocol::Native => serde_json::to_writer(
            &mut body,
            &OkBody {
                job_id: &job.job_id,
                status: "ok",
                model: &job.model.name,
                model_version: job.model.version.to_string(),
                model_sha256: &job.model.sha256,
                rows: job.answered_rows(),
                outputs: Outputs { columns, start, rows: job.answered_rows() },
                explanations: explained,
                timing_ms: timing,
                publisher: job.publisher.as_deref(),
            },
        ),
        Protocol::OpenInference => serde_json::to_writer(
            &mut body,
            &InferenceOkBody {
                model_name: &job.model.name,
                model_version: job.model.version.to_string(),
                id: &job.job_id,
                parameters: InferenceOkParameters {
                    status: "ok",
                    model_sha256: &job.model.sha256,
                    batching_ms: timing.batching,
                    inference_ms: timing.inference,
                    total_ms: timing.total,
                    publisher: job.publisher.as_deref(),
                },
                outputs: OutputTensors { columns, start, rows: job.answered_rows(), explained },
            },
        ),
    };
    encoded.map_err(|e| Rejection::Internal(format!("cannot encode the result: {e}")))?;
    Ok(body)
}

/// The `outputs` member of the ok result of a job that did not ask for explanations, byte for
/// byte as [`encode_ok`] writes it in the result body (compact JSON, which reads the same alone
/// as inside the body): the job's `rows` rows starting at `start` in `columns`, in the job's form.
pub fn encode_outputs(protocol: Protocol, columns: &[Column], start: usize, rows: usize) -> Result<Vec<u8>, Rejection> {
    let encoded = match protocol {
        Protocol::Native => serde_json::to_vec(&Outputs { columns, start, rows }),
        Protocol::OpenInference => serde_json::to_vec(&OutputTensors { columns, start, rows, explained: None }),
    };
    encoded.map_err(|e| Rejection::Internal(format!("cannot encode the outputs: {e}")))
}

/// About the size of an ok result, so that its buffer is allocated once: growing it by doubling
/// copies an explained result of a 100-row job (some 135 KB) several times over.
fn expected_size(rows: usize, columns: usize, explained: Option<&Explained>) -> usize {
    const HEAD: usize = 512;
    const PER_VALUE: usize = 12;
    const PER_REASON: usize = 160;
    let explanation = explained.map_or(0, |e| (e.explainer.features() + 4) * PER_VALUE + e.top_k * PER_REASON);
    HEAD + rows * (columns * 2 * PER_VALUE + explanation)
}

/// The Open Inference Protocol response.
#[derive(Serialize)]
struct InferenceOkBody<'a> {
    model_name: &'a str,
    model_version: String,
    id: &'a str,
    parameters: InferenceOkParameters<'a>,
    outputs: OutputTensors<'a>,
}

/// Protocol parameters hold only scalars, so the timings are flattened.
#[derive(Serialize)]
struct InferenceOkParameters<'a> {
    status: &'static str,
    model_sha256: &'a str,
    batching_ms: f64,
    inference_ms: f64,
    total_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<&'a str>,
}

/// The job's rows of every published output as protocol tensors, in model order; then, for an
/// explained job, `contributions` (FP32 `[rows, features]`) and `reasons` (BYTES `[rows]`, one
/// JSON text per row).
struct OutputTensors<'a> {
    columns: &'a [Column],
    start: usize,
    rows: usize,
    explained: Option<Explained<'a>>,
}

impl Serialize for OutputTensors<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let extra = if self.explained.is_some() { 2 } else { 0 };
        let mut seq = serializer.serialize_seq(Some(self.columns.len() + extra))?;
        for column in self.columns {
            seq.serialize_element(&OutputTensor { column, start: self.start, rows: self.rows })?;
        }
        if let Some(explained) = &self.explained {
            let features = explained.explainer.features();
            let contributions: Vec<f32> =
                explained.rows.iter().flat_map(|e| e.contributions.iter().map(|&c| c as f32)).collect();
            seq.serialize_element(&ExtraTensor {
                name: "contributions",
                shape: &[self.rows, features],
                datatype: "FP32",
                data: &contributions,
            })?;
            let reasons: Vec<RowReasons> =
                explained.each_row().map(|(row, e)| RowReasons { explained, row, e }).collect();
            seq.serialize_element(&ExtraTensor {
                name: "reasons",
                shape: &[self.rows],
                datatype: "BYTES",
                data: &JsonTexts(&reasons),
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct ExtraTensor<'a, D: Serialize + ?Sized> {
    name: &'static str,
    shape: &'a [usize],
    datatype: &'static str,
    data: &'a D,
}

/// A job's explanations with what their reasons are reported by.
#[derive(Clone, Copy)]
struct Explained<'a> {
    explainer: &'a Explainer,
    rows: &'a [Explanation],
    /// The job's rows, row-major.
    inputs: &'a [f32],
    /// The most reasons a row has.
    top_k: usize,
}

impl<'a> Explained<'a> {
    fn of(job: &'a JobMeta, explanations: Option<&'a [Explanation]>) -> Option<Self> {
        let explainer = job.model.explainer.as_ref()?;
        let request = job.explain.as_ref()?;
        Some(Explained { explainer, rows: explanations?, inputs: &request.inputs, top_k: request.top_k })
    }

    /// Each explanation with its row's values.
    fn each_row(&self) -> impl Iterator<Item = (&'a [f32], &'a Explanation)> {
        self.inputs.chunks_exact(self.explainer.features().max(1)).zip(self.rows)
    }
}

impl Serialize for Explained<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.rows.len()))?;
        for (row, e) in self.each_row() {
            seq.serialize_element(&RowExplanation {
                value: e.value,
                base_value: e.base_value,
                contributions: Float32s(&e.contributions),
                reasons: RowReasons { explained: self, row, e },
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct RowExplanation<'a> {
    value: f64,
    base_value: f64,
    contributions: Float32s<'a>,
    reasons: RowReasons<'a>,
}

/// Contributions written at float32 precision, the precision of the scores they explain: half
/// the digits of float64, for results that carry one per feature per row.
struct Float32s<'a>(&'a [f64]);

impl Serialize for Float32s<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|&v| v as f32))
    }
}

/// One row's reasons: `[{"feature", "value", "contribution", "code", "text"}, …]`.
struct RowReasons<'a> {
    explained: &'a Explained<'a>,
    row: &'a [f32],
    e: &'a Explanation,
}

impl Serialize for RowReasons<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.e.reasons.len()))?;
        for &feature in &self.e.reasons {
            let reason = self.explained.explainer.reason(self.e, self.row, feature);
            seq.serialize_element(&ReasonBody {
                feature: reason.feature,
                value: reason.value,
                contribution: reason.contribution as f32,
                code: reason.text.code.as_deref(),
                text: reason.text.text.as_deref(),
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct ReasonBody<'a> {
    feature: &'a str,
    value: f32,
    contribution: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

/// One output as `{"name", "shape", "datatype", "data"}`, data flat in row-major order.
struct OutputTensor<'a> {
    column: &'a Column,
    start: usize,
    rows: usize,
}

impl Serialize for OutputTensor<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Self { column, start, rows } = *self;
        let (from, to) = (start * column.row_len, (start + rows) * column.row_len);
        let shape: Vec<usize> = std::iter::once(rows).chain(column.row_shape.iter().copied()).collect();
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("name", &column.name)?;
        map.serialize_entry("shape", &shape)?;
        match &column.data {
            ColumnData::F32(v) => tensor_entries(&mut map, "FP32", &v[from..to])?,
            ColumnData::F64(v) => tensor_entries(&mut map, "FP64", &v[from..to])?,
            ColumnData::I64(v) => tensor_entries(&mut map, "INT64", &v[from..to])?,
            ColumnData::I32(v) => tensor_entries(&mut map, "INT32", &v[from..to])?,
            ColumnData::Bool(v) => tensor_entries(&mut map, "BOOL", &v[from..to])?,
            ColumnData::Str(v) => tensor_entries(&mut map, "BYTES", &v[from..to])?,
            // A sequence of maps has no tensor form: each row's map (shape [rows]) becomes one
            // JSON object text, which keeps the class labels the scores belong to.
            ColumnData::Maps(v) => tensor_entries(&mut map, "BYTES", &JsonTexts(&v[from..to]))?,
        }
        map.end()
    }
}

fn tensor_entries<M: SerializeMap, T: Serialize + ?Sized>(
    map: &mut M,
    datatype: &str,
    data: &T,
) -> Result<(), M::Error> {
    map.serialize_entry("datatype", datatype)?;
    map.serialize_entry("data", data)
}

/// Values serialised each as its own JSON text, as a sequence of strings.
struct JsonTexts<'a, T>(&'a [T]);

impl<T: Serialize> Serialize for JsonTexts<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for value in self.0 {
            seq.serialize_element(&serde_json::to_string(value).map_err(ser::Error::custom)?)?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    job_id: Option<&'a str>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
    error: ErrorDetail<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: ErrorCode,
    message: &'a str,
}

/// The Open Inference Protocol error response (`{"error": message}`), with what is known about
/// the job and the error code in `parameters`.
#[derive(Serialize)]
struct InferenceErrorBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<String>,
    error: &'a str,
    parameters: InferenceErrorParameters<'a>,
}

#[derive(Serialize)]
struct InferenceErrorParameters<'a> {
    status: &'static str,
    code: ErrorCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    publisher: Option<&'a str>,
}

pub fn encode_error(error: &Rejected) -> Vec<u8> {
    let encoded = match error.protocol {
        Protocol::Native => serde_json::to_vec(&ErrorBody {
            job_id: error.job_id.as_deref(),
            status: "error",
            model: error.model.as_deref(),
            model_version: error.model_version.map(|v| v.to_string()),
            error: ErrorDetail { code: error.reason.code(), message: error.reason.message() },
            publisher: error.publisher.as_deref(),
        }),
        Protocol::OpenInference => serde_json::to_vec(&InferenceErrorBody {
            id: error.job_id.as_deref(),
            model_name: error.model.as_deref(),
            model_version: error.model_version.map(|v| v.to_string()),
            error: error.reason.message(),
            parameters: InferenceErrorParameters {
                status: "error",
                code: error.reason.code(),
                publisher: error.publisher.as_deref(),
            },
        }),
    };
    // Invariant: the body holds only strings and integers, which always serialise.
    encoded.expect("error result serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::outputs::MapRow;

    fn column(name: &str, row_shape: Vec<usize>, data: ColumnData) -> Column {
        let row_len = row_shape.iter().product::<usize>().max(1);
        Column { name: name.into(), row_len, row_shape, data }
    }

    #[test]
    fn protocol_outputs_are_flat_tensors_of_the_jobs_rows() {
        let columns = [
            column("label", vec![], ColumnData::I64(vec![0, 1, 1])),
            column("probabilities", vec![2], ColumnData::F32(vec![0.5, 0.5, 0.25, 0.75, 1.0, f32::NAN])),
            column("names", vec![], ColumnData::Str(vec!["a".into(), "b".into(), "c".into()])),
            column("ok", vec![], ColumnData::Bool(vec![true, false, true])),
        ];
        let encoded =
            serde_json::to_value(OutputTensors { columns: &columns, start: 1, rows: 2, explained: None }).unwrap();
        assert_eq!(
            encoded,
            serde_json::json!([
                {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 1]},
                {"name": "probabilities", "shape": [2, 2], "datatype": "FP32", "data": [0.25, 0.75, 1.0, null]},
                {"name": "names", "shape": [2], "datatype": "BYTES", "data": ["b", "c"]},
                {"name": "ok", "shape": [2], "datatype": "BOOL", "data": [false, true]},
            ])
        );
    }

    #[test]
    fn class_score_maps_become_json_texts() {
        let maps = vec![MapRow::I64(vec![(0, 0.25), (1, 0.75)]), MapRow::Str(vec![("yes".into(), 0.5)])];
        let columns = [column("output_probability", vec![], ColumnData::Maps(maps))];
        let encoded =
            serde_json::to_value(OutputTensors { columns: &columns, start: 0, rows: 2, explained: None }).unwrap();
        assert_eq!(
            encoded,
            serde_json::json!([{
                "name": "output_probability",
                "shape": [2],
                "datatype": "BYTES",
                "data": [r#"{"0":0.25,"1":0.75}"#, r#"{"yes":0.5}"#],
            }])
        );
    }

    #[test]
    fn the_outputs_alone_are_the_bytes_of_the_results_outputs_member() {
        #[derive(serde::Deserialize)]
        struct Body<'a> {
            #[serde(borrow)]
            outputs: &'a serde_json::value::RawValue,
        }
        let model = crate::testing::linear_model(1, crate::settings::BatchingSettings::default());
        let columns = [
            column("label", vec![], ColumnData::I64(vec![0, 1, 1])),
            column("probabilities", vec![2], ColumnData::F32(vec![0.5, 0.5, 0.1, 0.9, 1.0 / 3.0, f32::NAN])),
        ];
        let timing = Timing { batching: 1.0, inference: 2.0, total: 3.0 };
        for protocol in [Protocol::Native, Protocol::OpenInference] {
            let job = crate::testing::job(&model, 1, 2, crate::flow::Lane::Online);
            let meta = Arc::new(JobMeta { protocol, ..Arc::into_inner(job.meta).expect("one owner") });
            let body = encode_ok(&meta, &columns, 1, timing, None).expect("encoded");
            let outputs = serde_json::from_slice::<Body>(&body).expect("a result with outputs").outputs;
            let alone = encode_outputs(protocol, &columns, 1, 2).expect("encoded");
            assert_eq!(String::from_utf8(alone).expect("UTF-8"), outputs.get(), "{protocol:?}");
        }
    }

    #[test]
    fn errors_answer_in_the_jobs_form() {
        let error = Rejected {
            job_id: Some("a".into()),
            model: Some("m".into()),
            model_version: Some(2),
            protocol: Protocol::OpenInference,
            publisher: None,
            reason: Rejection::UnknownModel("no such model".into()),
        };
        let encoded: serde_json::Value = serde_json::from_slice(&encode_error(&error)).unwrap();
        assert_eq!(
            encoded,
            serde_json::json!({
                "id": "a",
                "model_name": "m",
                "model_version": "2",
                "error": "no such model",
                "parameters": {"status": "error", "code": "unknown_model"},
            })
        );
        let anonymous = Rejected { job_id: None, model: None, model_version: None, ..error.clone() };
        let encoded: serde_json::Value = serde_json::from_slice(&encode_error(&anonymous)).unwrap();
        assert_eq!(
            encoded,
            serde_json::json!({"error": "no such model", "parameters": {"status": "error", "code": "unknown_model"}})
        );
        let native = Rejected { protocol: Protocol::Native, ..error.clone() };
        let encoded: serde_json::Value = serde_json::from_slice(&encode_error(&native)).unwrap();
        assert_eq!(encoded["status"], "error");
        assert_eq!(encoded["error"]["code"], "unknown_model");
        assert!(encoded.get("publisher").is_none(), "no user_id, no publisher: {encoded}");
    }

    #[test]
    fn errors_name_the_publisher_in_both_forms() {
        let forbidden = Rejected {
            job_id: Some("a".into()),
            model: Some("m".into()),
            model_version: None,
            protocol: Protocol::Native,
            publisher: Some("core-banking".into()),
            reason: Rejection::Forbidden("publisher \"core-banking\" may not score model m".into()),
        };
        let native: serde_json::Value = serde_json::from_slice(&encode_error(&forbidden)).unwrap();
        assert_eq!(native["publisher"], "core-banking");
        assert_eq!(native["error"]["code"], "forbidden");
        let protocol = Rejected { protocol: Protocol::OpenInference, ..forbidden };
        let protocol: serde_json::Value = serde_json::from_slice(&encode_error(&protocol)).unwrap();
        assert_eq!(
            protocol["parameters"],
            serde_json::json!({"status": "error", "code": "forbidden", "publisher": "core-banking"})
        );
    }
}

//! One model version: its signature read from the ONNX file, its per-model config, and the pool
//! of ONNX Runtime sessions that run its batches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool::unmanaged::{Object, Pool};
use ort::session::Session;
use ort::value::{DynMapValueType, DynValue, TensorElementType, TensorRef, ValueType};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::outputs::{Column, ColumnData, Element, MapKeyType, MapRow, OutputKind};
use crate::explain::{ExplainConfig, Explainer};
use crate::settings::{BatchingSettings, Engine, ExecutionProvider, InferenceSettings, ProviderUnavailable};

/// `<model>/config.yaml`: everything optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub description: Option<String>,
    /// Feature names in input order; needed for jobs that send `records`.
    pub features: Option<Vec<String>>,
    /// Outputs published in results (default: all).
    pub outputs: Option<Vec<String>>,
    /// An empty `batching:` (every key commented out) means no override.
    #[serde(default, deserialize_with = "empty_as_default")]
    pub batching: BatchingOverride,
    /// Which versions on disk are served (default: all).
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Overrides of `inference.execution_provider`, `cuda_device_id` and `cuda_memory_limit_mb`.
    pub execution_provider: Option<ExecutionProvider>,
    pub cuda_device_id: Option<i32>,
    pub cuda_memory_limit_mb: Option<u64>,
    /// How scores are explained (docs/EXPLANATIONS.md); jobs may ask for explanations only when set.
    pub explain: Option<ExplainConfig>,
    /// The broker users whose jobs may score this model (the AMQP `user_id` of the job); any other
    /// job, and one without `user_id`, is answered `forbidden`. Absent: any publisher; `[]`: none.
    pub allowed_publishers: Option<Vec<String>>,
}

impl ModelConfig {
    /// Parses a config.yaml text with the YAML parser that also reads the settings file, so the
    /// two files follow the same YAML rules. Errors name the key and the problem; the caller
    /// names the file.
    pub fn from_yaml(text: &str) -> Result<Self, config::ConfigError> {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Yaml))
            .build()
            .and_then(config::Config::try_deserialize)
    }

    /// The worker's inference settings with this model's provider overrides applied.
    pub fn inference(&self, defaults: InferenceSettings) -> InferenceSettings {
        InferenceSettings {
            execution_provider: self.execution_provider.unwrap_or(defaults.execution_provider),
            cuda_device_id: self.cuda_device_id.unwrap_or(defaults.cuda_device_id),
            cuda_memory_limit_mb: self.cuda_memory_limit_mb.unwrap_or(defaults.cuda_memory_limit_mb),
            ..defaults
        }
    }
}

/// `version_policy` in config.yaml: `all`, `{latest: N}` (the N highest versions) or
/// `{specific: [1, 3]}`. Jobs that pin a version outside the policy get `unknown_model`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "version_policy must be all, {latest: N} or {specific: [versions]}")]
pub enum VersionPolicy {
    Latest { latest: usize },
    Specific { specific: Vec<u64> },
    All(AllVersions),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllVersions {
    All,
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::All(AllVersions::All)
    }
}

impl VersionPolicy {
    /// The versions to serve out of `available`, sorted ascending.
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        let mut sorted = available.to_vec();
        sorted.sort_unstable();
        match self {
            VersionPolicy::All(_) => sorted,
            VersionPolicy::Latest { latest } => sorted.split_off(sorted.len().saturating_sub(*latest)),
            VersionPolicy::Specific { specific } => sorted.into_iter().filter(|v| specific.contains(v)).collect(),
        }
    }
}

/// A key present with no value (`batching:`) reads as the default.
fn empty_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingOverride {
    pub max_batch_rows: Option<usize>,
    pub max_delay_ms: Option<u64>,
}

impl BatchingOverride {
    pub fn apply(&self, defaults: BatchingSettings) -> BatchingSettings {
        BatchingSettings {
            max_batch_rows: self.max_batch_rows.unwrap_or(defaults.max_batch_rows).max(1),
            max_delay_ms: self.max_delay_ms.unwrap_or(defaults.max_delay_ms),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model {model} version {version} ({path}): {problem}")]
    Invalid { model: String, version: u64, path: PathBuf, problem: String },
}

/// Why a batch produced no scores; the rows' jobs are answered with `internal`.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("ONNX Runtime failed: {0}")]
    Runtime(#[from] ort::Error),
    #[error("output {output} has {got} rows for a batch of {expected}")]
    RowMismatch { output: String, got: usize, expected: usize },
    #[error("session pool closed")]
    PoolClosed,
    #[error("ONNX Runtime run panicked")]
    Panicked,
}

#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
}

/// What the worker needs to know to feed and read a model.
#[derive(Debug, Clone)]
pub struct Signature {
    pub input_name: String,
    pub n_features: usize,
    /// Every output of the model, in model order.
    pub outputs: Vec<OutputSpec>,
}

impl Signature {
    /// An error naming the outputs there are when the model has no output `name`, which
    /// config.yaml `uses` (`publishes`, `explains`).
    fn check_output(&self, uses: &str, name: &str) -> Result<(), String> {
        if self.outputs.iter().any(|o| o.name == name) {
            return Ok(());
        }
        let available: Vec<_> = self.outputs.iter().map(|o| o.name.as_str()).collect();
        Err(format!(
            "config.yaml {uses} output {name:?}, which the model does not have (outputs: {})",
            available.join(", ")
        ))
    }
}

pub struct ModelVersion {
    /// Unique to this load within the process: a file replaced under the same version number
    /// loads with a new id, so its batches never mix with the old file's.
    pub id: u64,
    pub name: String,
    pub version: u64,
    pub path: PathBuf,
    /// Hex sha256 of the model file: which bytes scored a job, for audit.
    pub sha256: String,
    pub description: Option<String>,
    pub signature: Signature,
    /// Outputs published in results, in model order.
    pub published: Vec<OutputSpec>,
    pub feature_names: Option<Vec<String>>,
    pub feature_index: HashMap<String, usize>,
    /// Present when config.yaml has `explain`.
    pub explainer: Option<Explainer>,
    /// config.yaml `allowed_publishers`: who may score this version; `None`: anyone.
    pub allowed_publishers: Option<Vec<String>>,
    pub batching: BatchingSettings,
    /// The execution provider the sessions run on (CPU after a permitted fallback from CUDA).
    pub provider: ExecutionProvider,
    engine: Engine,
    sessions: Pool<Session>,
}

impl std::fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelVersion({} v{})", self.name, self.version)
    }
}

pub type PooledSession = Object<Session>;

impl ModelVersion {
    /// Builds `inference.sessions` sessions for `path`, checks the signature against `config`
    /// and warms every session up with one run, so the first job does not pay for it. `path` is
    /// `<model>/<version>/model.onnx` in a repository: files config.yaml names are in `<model>/`.
    pub fn load(
        env: &ort::environment::Environment,
        name: &str,
        version: u64,
        path: &Path,
        config: &ModelConfig,
        inference: InferenceSettings,
        batching: BatchingSettings,
    ) -> Result<Self, ModelError> {
        let folder = path.parent().and_then(Path::parent).unwrap_or(Path::new("."));
        Self::load_from(env, name, version, path, folder, config, inference, batching)
    }

    /// [`ModelVersion::load`] of a model file outside a repository's layout (the model archive),
    /// whose config names files relative to `config_folder`.
    #[allow(clippy::too_many_arguments)]
    pub fn load_from(
        env: &ort::environment::Environment,
        name: &str,
        version: u64,
        path: &Path,
        config_folder: &Path,
        config: &ModelConfig,
        inference: InferenceSettings,
        batching: BatchingSettings,
    ) -> Result<Self, ModelError> {
        let invalid = |problem: String| ModelError::Invalid {
            model: name.to_string(),
            version,
            path: path.to_path_buf(),
            problem,
        };
        if config.allowed_publishers.iter().flatten().any(String::is_empty) {
            return Err(invalid("config.yaml allowed_publishers holds an empty user name".into()));
        }
        let bytes = std::fs::read(path).map_err(|e| invalid(format!("cannot read the model file: {e}")))?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        let inference = config.inference(inference);
        let mut sessions = Vec::with_capacity(inference.sessions);
        let mut provider = inference.execution_provider;
        for _ in 0..inference.sessions {
            let opened = open_session(env, path, inference).map_err(invalid)?;
            provider = opened.provider;
            sessions.push(opened.session);
        }
        let signature = read_signature(&sessions[0], config.features.as_ref().map(Vec::len)).map_err(invalid)?;
        if let Some(features) = &config.features {
            if features.len() != signature.n_features {
                return Err(invalid(format!(
                    "config.yaml lists {} features but the model input has {}",
                    features.len(),
                    signature.n_features
                )));
            }
        }
        let published = match &config.outputs {
            None => signature.outputs.clone(),
            Some(wanted) => {
                for name in wanted {
                    signature.check_output("publishes", name).map_err(invalid)?;
                }
                signature.outputs.iter().filter(|o| wanted.contains(&o.name)).cloned().collect()
            }
        };
        let feature_index = config.features.iter().flatten().enumerate().map(|(i, f)| (f.clone(), i)).collect();
        let explainer = match &config.explain {
            Some(explain) => Some(
                explainer(explain, &bytes, config_folder, &signature, config.features.as_deref()).map_err(invalid)?,
            ),
            None => None,
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut model = Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            version,
            path: path.to_path_buf(),
            sha256,
            description: config.description.clone(),
            signature,
            published,
            feature_names: config.features.clone(),
            feature_index,
            explainer,
            allowed_publishers: config.allowed_publishers.clone(),
            batching: config.batching.apply(batching),
            provider,
            engine: inference.engine,
            sessions: Pool::from(Vec::new()),
        };
        let zeros = vec![0.0; model.signature.n_features];
        for session in &mut sessions {
            model.run(session, &zeros, 1).map_err(|e| invalid(format!("the warm-up run failed: {e}")))?;
        }
        if let Some(mut explainer) = model.explainer.take() {
            if explainer.reads_scores() {
                model.score_baseline(&mut sessions[0], &mut explainer).map_err(invalid)?;
            }
            model.explainer = Some(explainer);
        }
        model.sessions = Pool::from(sessions);
        Ok(model)
    }

    /// Scores the explainer's baseline for its base value (the sampling method reads g from the
    /// model's own scores).
    fn score_baseline(&self, session: &mut Session, explainer: &mut Explainer) -> Result<(), String> {
        let columns = self
            .run(session, explainer.baseline(), 1)
            .map_err(|e| format!("scoring the explain baseline failed: {e}"))?;
        let column = columns.iter().find(|c| c.name == explainer.output).ok_or_else(|| {
            format!(
                "config.yaml explains output {} by sampling, which reads its scores: publish it (outputs)",
                explainer.output
            )
        })?;
        explainer.set_base_value(&column.numbers(0)).map_err(|e| format!("config.yaml explain: {e}"))
    }

    /// Sessions running a batch and sessions free.
    pub fn session_usage(&self) -> (usize, usize) {
        let status = self.sessions.status();
        (status.size.saturating_sub(status.available), status.available)
    }

    /// Waits for a free session; completes at once when the engine for this model is idle.
    pub async fn session(&self) -> Result<PooledSession, InferenceError> {
        self.sessions.get().await.map_err(|_| InferenceError::PoolClosed)
    }

    /// Runs one batch (`rows × n_features`, row-major) and returns the published outputs.
    pub fn run(&self, session: &mut Session, inputs: &[f32], rows: usize) -> Result<Vec<Column>, InferenceError> {
        if self.engine == Engine::Noop {
            return Ok(self.published.iter().map(|spec| Column::zeros(&spec.name, &spec.kind, rows)).collect());
        }
        let tensor = TensorRef::from_array_view(([rows, self.signature.n_features], inputs))?;
        let mut outputs = session.run(ort::inputs![self.signature.input_name.as_str() => tensor])?;
        let mut columns = Vec::with_capacity(self.published.len());
        for spec in &self.published {
            let value = outputs
                .remove(&spec.name)
                .ok_or_else(|| ort::Error::new(format!("output {} missing from the run", spec.name)))?;
            let column = read_column(spec, &value)?;
            if column.rows() != rows {
                return Err(InferenceError::RowMismatch {
                    output: spec.name.clone(),
                    got: column.rows(),
                    expected: rows,
                });
            }
            columns.push(column);
        }
        Ok(columns)
    }
}

/// The explainer of a version whose config.yaml names files relative to `folder`.
fn explainer(
    config: &ExplainConfig,
    bytes: &[u8],
    folder: &Path,
    signature: &Signature,
    features: Option<&[String]>,
) -> Result<Explainer, String> {
    signature.check_output("explains", &config.output)?;
    Explainer::build(config, bytes, folder, features, signature.n_features).map_err(|e| format!("config.yaml {e}"))
}

/// A session and the execution provider it runs on.
pub struct OpenedSession {
    pub session: Session,
    pub provider: ExecutionProvider,
}

/// Opens `path` on the configured execution provider. CUDA is registered with
/// `error_on_failure`, so an unavailable GPU is noticed here, not as a silent CPU run.
pub fn open_session(
    env: &ort::environment::Environment,
    path: &Path,
    inference: InferenceSettings,
) -> Result<OpenedSession, String> {
    let text = |e: ort::Error| e.to_string();
    let mut builder =
        Session::builder(env).map_err(text)?.with_inter_threads(1).map_err(|e| text(ort::Error::<()>::from(e)))?;
    if inference.intra_threads > 0 {
        builder = builder.with_intra_threads(inference.intra_threads).map_err(|e| text(ort::Error::<()>::from(e)))?;
    }
    builder =
        builder.with_intra_op_spinning(inference.intra_op_spinning).map_err(|e| text(ort::Error::<()>::from(e)))?;
    let provider = match inference.execution_provider {
        ExecutionProvider::Cpu => ExecutionProvider::Cpu,
        ExecutionProvider::Cuda => {
            let mut cuda = ort::ep::CUDA::default().with_device_id(inference.cuda_device_id);
            if inference.cuda_memory_limit_mb > 0 {
                cuda = cuda.with_memory_limit((inference.cuda_memory_limit_mb as usize).saturating_mul(1 << 20));
            }
            match builder.with_execution_providers([cuda.build().error_on_failure()]) {
                Ok(with_cuda) => {
                    builder = with_cuda;
                    ExecutionProvider::Cuda
                }
                Err(error) if inference.on_provider_unavailable == ProviderUnavailable::Cpu => {
                    tracing::warn!(path = %path.display(), %error,
                        "the CUDA execution provider is unavailable; running on the CPU (inference.on_provider_unavailable: cpu)");
                    builder = error.recover();
                    ExecutionProvider::Cpu
                }
                Err(error) => return Err(format!("{CUDA_UNAVAILABLE}: {error}")),
            }
        }
    };
    let session = builder.commit_from_file(path).map_err(text)?;
    Ok(OpenedSession { session, provider })
}

const CUDA_UNAVAILABLE: &str = "the CUDA execution provider is unavailable (install the GPU build of ONNX Runtime, \
    onnxruntime-gpu==1.31.1 with CUDA 13 and cuDNN 9, as docs/GPU.md describes, \
    or set inference.on_provider_unavailable: cpu to run on the CPU instead)";

/// Accepts exactly one float input `[batch, features]`; the feature count comes from the model,
/// or from config.yaml when the model leaves that dimension open.
pub fn read_signature(session: &Session, configured_features: Option<usize>) -> Result<Signature, String> {
    let [input] = session.inputs() else {
        return Err(format!(
            "the model has {} inputs; batchscore serves models with one float input [batch, features]",
            session.inputs().len()
        ));
    };
    let n_features = match input.dtype() {
        ValueType::Tensor { ty: TensorElementType::Float32, shape, .. } if shape.len() == 2 => match shape[1] {
            n if n > 0 => n as usize,
            _ => configured_features.ok_or_else(|| {
                format!("input {} has an open feature dimension; list the features in config.yaml", input.name())
            })?,
        },
        other => {
            return Err(format!(
                "input {} is {other}; batchscore serves models with one float input [batch, features]",
                input.name()
            ))
        }
    };
    let outputs = session
        .outputs()
        .iter()
        .map(|o| Ok(OutputSpec { name: o.name().to_string(), kind: output_kind(o.name(), o.dtype())? }))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Signature { input_name: input.name().to_string(), n_features, outputs })
}

fn output_kind(name: &str, dtype: &ValueType) -> Result<OutputKind, String> {
    let unsupported = || format!("output {name} has unsupported type {dtype}");
    match dtype {
        ValueType::Tensor { ty, shape, .. } => {
            let element = match ty {
                TensorElementType::Float32 => Element::F32,
                TensorElementType::Float64 => Element::F64,
                TensorElementType::Int64 => Element::I64,
                TensorElementType::Int32 => Element::I32,
                TensorElementType::Bool => Element::Bool,
                TensorElementType::String => Element::Str,
                _ => return Err(unsupported()),
            };
            let row_shape = shape.iter().skip(1).map(|&d| d.max(0) as usize).collect();
            Ok(OutputKind::Tensor { element, row_shape })
        }
        ValueType::Sequence(inner) => match inner.as_ref() {
            ValueType::Map { key: TensorElementType::Int64, value: TensorElementType::Float32 } => {
                Ok(OutputKind::MapSequence { key: MapKeyType::I64 })
            }
            ValueType::Map { key: TensorElementType::String, value: TensorElementType::Float32 } => {
                Ok(OutputKind::MapSequence { key: MapKeyType::Str })
            }
            _ => Err(unsupported()),
        },
        _ => Err(unsupported()),
    }
}

fn read_column(spec: &OutputSpec, value: &DynValue) -> Result<Column, ort::Error> {
    let column = |row_shape: Vec<usize>, data| Column {
        name: spec.name.clone(),
        row_len: row_shape.iter().product::<usize>().max(1),
        row_shape,
        data,
    };
    // Row shapes come from the run, not the signature: dynamic dimensions are known only now.
    let row_shape = |shape: &[i64]| shape.iter().skip(1).map(|&d| d as usize).collect::<Vec<_>>();
    Ok(match &spec.kind {
        OutputKind::Tensor { element, .. } => match element {
            Element::F32 => {
                let (shape, data) = value.try_extract_tensor::<f32>()?;
                column(row_shape(shape), ColumnData::F32(data.to_vec()))
            }
            Element::F64 => {
                let (shape, data) = value.try_extract_tensor::<f64>()?;
                column(row_shape(shape), ColumnData::F64(data.to_vec()))
            }
            Element::I64 => {
                let (shape, data) = value.try_extract_tensor::<i64>()?;
                column(row_shape(shape), ColumnData::I64(data.to_vec()))
            }
            Element::I32 => {
                let (shape, data) = value.try_extract_tensor::<i32>()?;
                column(row_shape(shape), ColumnData::I32(data.to_vec()))
            }
            Element::Bool => {
                let (shape, data) = value.try_extract_tensor::<bool>()?;
                column(row_shape(shape), ColumnData::Bool(data.to_vec()))
            }
            Element::Str => {
                let (shape, data) = value.try_extract_strings()?;
                column(row_shape(shape), ColumnData::Str(data))
            }
        },
        OutputKind::MapSequence { key } => {
            let maps = value.try_extract_sequence::<DynMapValueType>()?;
            let rows = maps
                .iter()
                .map(|map| match key {
                    MapKeyType::I64 => map.try_extract_key_values::<i64, f32>().map(MapRow::I64),
                    MapKeyType::Str => map.try_extract_key_values::<String, f32>().map(MapRow::Str),
                })
                .collect::<Result<Vec<_>, _>>()?;
            column(vec![], ColumnData::Maps(rows))
        }
    })
}

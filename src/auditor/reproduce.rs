//! `batchscore audit reproduce`: scores a recorded job again and compares the result with its
//! audit record. It owns finding the model file a record names by its sha256 (in the repository,
//! else in the model archive), checking that the job given is the one recorded (its rows as the
//! worker decodes them give the record's `inputs_sha256`), re-scoring those rows on the CPU as
//! one batch, and the report: where the file was found, and whether the outputs are the recorded
//! bytes, equal within [`ABSOLUTE_TOLERANCE`] / [`RELATIVE_TOLERANCE`], or different.
//!
//! The job is decoded by [`crate::job`] and its outputs written by [`crate::encode`], the very
//! code the worker runs, so a reproduction checks the worker's own reading of the job.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit;
use crate::encode;
use crate::engine::archive;
use crate::engine::model::ModelConfig;
use crate::engine::repository;
use crate::engine::runtime::{self, RuntimeError};
use crate::engine::{InferenceError, ModelVersion};
use crate::job::{self, Envelope, JobRequest};
use crate::settings::{Engine, ExecutionProvider, InferenceSettings, LimitSettings, Settings};

/// Scores within this absolute difference of the recorded ones count as equal...
pub const ABSOLUTE_TOLERANCE: f64 = 1e-6;
/// ...and so do scores within this difference relative to the larger of the two: float32 scores
/// may differ in their last bits with the batch they were scored in.
pub const RELATIVE_TOLERANCE: f64 = 1e-5;

/// `batchscore audit reproduce`: where the record comes from, and the job.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("record_source").required(true)))]
pub struct ReproduceArgs {
    /// The job's audit record: a file holding one record of the audit stream (JSON).
    #[arg(long, group = "record_source")]
    pub record: Option<PathBuf>,
    /// The job as it was sent: a file holding its message body (JSON, native or Open Inference
    /// Protocol form).
    #[arg(long)]
    pub input: PathBuf,
}

/// Where a record is read from. Each way of naming a record (`--record`, …) is one variant.
#[derive(Debug, Clone)]
pub enum RecordSource {
    File(PathBuf),
}

impl ReproduceArgs {
    /// The record source the arguments name (clap lets exactly one through).
    pub fn source(&self) -> Result<RecordSource, ReproduceError> {
        match &self.record {
            Some(path) => Ok(RecordSource::File(path.clone())),
            None => Err(ReproduceError::NoRecord),
        }
    }
}

/// Why a job could not be reproduced. [`ReproduceError::is_setup`] tells the problems a person
/// must fix before a reproduction can run (exit 2) from a reproduction that failed (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum ReproduceError {
    #[error("no audit record given; name one with --record FILE")]
    NoRecord,
    #[error("cannot read the record {}: {source}; give the file holding the job's audit record", path.display())]
    RecordUnreadable { path: PathBuf, source: std::io::Error },
    #[error("{origin} is not an audit record: {problem}; give one record of the audit stream, as JSON")]
    RecordInvalid { origin: String, problem: String },
    #[error("the record of job {job_id} has no {member} ({why}), so it has no scores to reproduce")]
    NothingToReproduce { job_id: String, member: &'static str, why: &'static str },
    #[error("cannot read the job {}: {source}; give the file holding the job's message body", path.display())]
    InputUnreadable { path: PathBuf, source: std::io::Error },
    #[error("the input is not the job that was recorded: {problem}")]
    NotTheJob { problem: String },
    #[error(
        "the input is not the job that was recorded: its rows, as the worker reads them, have inputs_sha256 \
         {computed}; the record says {recorded}"
    )]
    InputsDigest { recorded: String, computed: String },
    #[error(
        "no model file with sha256 {sha256} (model {model}) found; looked in {looked}. Set models.archive on the \
         workers so that every file they serve is kept, and point this command's settings at the same archive"
    )]
    ModelNotFound { sha256: String, model: String, looked: String },
    #[error("the model file {} has sha256 {actual}, not {recorded} as recorded: the archive holds another file", path.display())]
    ModelDigest { path: PathBuf, recorded: String, actual: String },
    #[error(
        "model file {} with sha256 {sha256} does not load under any config it was served with: {problems}",
        path.display()
    )]
    ModelUnloadable { path: PathBuf, sha256: String, problems: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("scoring the job again failed: {0}")]
    Inference(#[from] InferenceError),
    #[error("cannot encode the outputs: {0}")]
    Encode(String),
    #[error("the outputs scored again differ from the record")]
    Differs,
}

impl ReproduceError {
    /// A problem a person must fix before anything can be reproduced (exit 2).
    pub fn is_setup(&self) -> bool {
        matches!(
            self,
            ReproduceError::NoRecord
                | ReproduceError::RecordUnreadable { .. }
                | ReproduceError::RecordInvalid { .. }
                | ReproduceError::NothingToReproduce { .. }
                | ReproduceError::InputUnreadable { .. }
                | ReproduceError::ModelNotFound { .. }
                | ReproduceError::ModelUnloadable { .. }
                | ReproduceError::Runtime(_)
        )
    }
}

/// What a record says that a reproduction needs (schemas/audit-record.schema.json).
#[derive(Debug, Deserialize)]
pub struct Recorded {
    pub job_id: Option<String>,
    pub status: String,
    pub model: Option<String>,
    pub version: Option<u64>,
    pub model_sha256: Option<String>,
    pub inputs_sha256: Option<String>,
    #[serde(default)]
    pub outputs: Option<Box<RawValue>>,
    pub outputs_sha256: Option<String>,
}

impl Recorded {
    /// Reads a record body; `origin` names it in errors.
    pub fn parse(body: &[u8], origin: &str) -> Result<Self, ReproduceError> {
        serde_json::from_slice(body)
            .map_err(|e| ReproduceError::RecordInvalid { origin: origin.to_string(), problem: e.to_string() })
    }

    /// The facts of a scored job, or why the record has none.
    fn scored(&self) -> Result<Scored<'_>, ReproduceError> {
        let job_id = self.job_id.clone().unwrap_or_else(|| "(no id)".into());
        let missing = |member, why| ReproduceError::NothingToReproduce { job_id: job_id.clone(), member, why };
        if self.status != "ok" {
            return Err(missing("scores", "it was answered with an error"));
        }
        let not_bound = "the job was not bound to a model file";
        Ok(Scored {
            job_id: self.job_id.as_deref(),
            model: self.model.as_deref().ok_or_else(|| missing("model", not_bound))?,
            version: self.version,
            model_sha256: self.model_sha256.as_deref().ok_or_else(|| missing("model_sha256", not_bound))?,
            inputs_sha256: self
                .inputs_sha256
                .as_deref()
                .ok_or_else(|| missing("inputs_sha256", "its rows were not read"))?,
            outputs: self.outputs.as_deref(),
            outputs_sha256: self
                .outputs_sha256
                .as_deref()
                .ok_or_else(|| missing("outputs_sha256", "it has no outputs"))?,
        })
    }
}

/// A record of a scored job.
struct Scored<'a> {
    job_id: Option<&'a str>,
    model: &'a str,
    version: Option<u64>,
    model_sha256: &'a str,
    inputs_sha256: &'a str,
    outputs: Option<&'a RawValue>,
    outputs_sha256: &'a str,
}

/// Reads the record `source` names: its body, and a name for it in messages. Asynchronous, as
/// reading a record from the audit stream is.
pub async fn read_record(source: &RecordSource) -> Result<(Vec<u8>, String), ReproduceError> {
    match source {
        RecordSource::File(path) => std::fs::read(path)
            .map(|body| (body, path.display().to_string()))
            .map_err(|source| ReproduceError::RecordUnreadable { path: path.clone(), source }),
    }
}

/// Reproduces the job the arguments name. `Ok` holds the report, whatever it concludes.
pub async fn run(settings: &Settings, args: &ReproduceArgs) -> Result<Report, ReproduceError> {
    let (body, origin) = read_record(&args.source()?).await?;
    run_recorded(settings, &body, &origin, &args.input).await
}

/// Reproduces the job in the file `input` as the record `body` (read from `origin`) says it was
/// scored.
pub async fn run_recorded(
    settings: &Settings,
    body: &[u8],
    origin: &str,
    input: &Path,
) -> Result<Report, ReproduceError> {
    let record = Recorded::parse(body, origin)?;
    let job =
        std::fs::read(input).map_err(|source| ReproduceError::InputUnreadable { path: input.to_path_buf(), source })?;
    reproduce(settings, &record, &job).await
}

/// Scores `job` (a message body) again as `record` says it was scored, and compares.
pub async fn reproduce(settings: &Settings, record: &Recorded, job: &[u8]) -> Result<Report, ReproduceError> {
    let scored = record.scored()?;
    let request = decode(job, &scored)?;
    // Before ONNX Runtime is loaded: a file found nowhere is said without needing it.
    let located = locate(settings, &scored)?;
    let env = runtime::environment(settings.onnxruntime.library_path.as_deref())?;
    let bound = bind(env, settings, &scored, &located, &request)?;
    let rows = request.features.row_count();
    let mut session = bound.model.session().await?;
    let columns = bound.model.run(&mut session, &bound.inputs, rows)?;
    let outputs = encode::encode_outputs(request.protocol, &columns, 0, rows)
        .map_err(|rejection| ReproduceError::Encode(rejection.to_string()))?;
    let comparison = compare(&scored, &outputs, request.explain.is_some());
    Ok(Report {
        job_id: request.job_id,
        model: scored.model.to_string(),
        version: scored.version,
        sha256: scored.model_sha256.to_string(),
        place: located.place,
        file: located.file,
        config: bound.config,
        inputs_sha256: scored.inputs_sha256.to_string(),
        rows,
        features: bound.model.signature.n_features,
        comparison,
    })
}

/// Decodes the job as the worker does. The job's id and model may have come from its message
/// (`message_id`, the `x-model` header of a protocol job), which the body alone lacks: the
/// record's are used where the body has none.
fn decode(body: &[u8], scored: &Scored<'_>) -> Result<JobRequest, ReproduceError> {
    // The job was taken within the worker's limits; this machine's settings must not refuse it.
    let limits = LimitSettings { max_rows_per_job: usize::MAX, max_job_bytes: usize::MAX, ..LimitSettings::default() };
    let envelope = Envelope { body, message_id: scored.job_id, content_type: None, model_header: None };
    // A header marks a job as a protocol one, so it is tried only for a body that needs it:
    // a native job with the header would have been refused, and have no scores recorded.
    let request = job::decode(envelope, &limits)
        .or_else(|first| {
            job::decode(Envelope { model_header: Some(scored.model), ..envelope }, &limits).map_err(|_| first)
        })
        .map_err(|rejected| ReproduceError::NotTheJob {
            problem: format!("the worker would not score it: {}", rejected.reason.message()),
        })?;
    if let Some(recorded) = scored.job_id.filter(|id| *id != request.job_id) {
        return Err(ReproduceError::NotTheJob {
            problem: format!("it is job {:?}, the record is of job {recorded:?}", request.job_id),
        });
    }
    if request.model != scored.model {
        return Err(ReproduceError::NotTheJob {
            problem: format!("it names model {:?}, the record model {:?}", request.model, scored.model),
        });
    }
    Ok(request)
}

/// Where the model file was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// In the repository, as this version.
    Repository {
        version: u64,
    },
    Archive,
}

/// The model file of a record, and the configs it may have been served with, most likely first.
struct Located {
    file: PathBuf,
    place: Place,
    configs: Vec<Config>,
}

/// A config a version may have been served with, and the folder the files it names are in.
struct Config {
    /// The file, or a description of the default config.
    name: String,
    folder: PathBuf,
    config: Result<ModelConfig, String>,
}

/// Finds the record's model file by its sha256: in the repository under the record's model (any
/// version), else in the archive; and the configs to try: the repository's config.yaml, then
/// every config the archive holds for the file.
fn locate(settings: &Settings, scored: &Scored<'_>) -> Result<Located, ReproduceError> {
    let mut looked = Vec::new();
    let repository = &settings.models.repository;
    let in_repository = find_in_repository(repository, scored);
    looked.push(format!("the repository {} (model {})", repository.display(), scored.model));
    let archived = settings.models.archive().map(|archive| archive::folder(archive, scored.model_sha256));
    let mut configs = Vec::new();
    if in_repository.is_some() {
        let folder = repository.join(scored.model);
        let config = repository::read_config(&folder).map(|(config, _)| config).map_err(|e| e.to_string());
        configs.push(Config { name: folder.join(repository::CONFIG_FILE).display().to_string(), folder, config });
    }
    if let Some(folder) = &archived {
        looked.push(format!("the model archive {} (models.archive)", folder.display()));
        configs.extend(archived_configs(folder));
    } else {
        looked.push("no model archive (models.archive is not set)".to_string());
    }
    let (file, place) = match (in_repository, &archived) {
        (Some((version, file)), _) => (file, Place::Repository { version }),
        (None, Some(folder)) if folder.join(archive::MODEL_FILE).is_file() => {
            let file = folder.join(archive::MODEL_FILE);
            let actual = file_sha256(&file).map_err(|source| ReproduceError::ModelNotFound {
                sha256: scored.model_sha256.to_string(),
                model: scored.model.to_string(),
                looked: format!("{} (unreadable: {source})", file.display()),
            })?;
            if actual != scored.model_sha256 {
                return Err(ReproduceError::ModelDigest {
                    path: file,
                    recorded: scored.model_sha256.to_string(),
                    actual,
                });
            }
            (file, Place::Archive)
        }
        _ => {
            return Err(ReproduceError::ModelNotFound {
                sha256: scored.model_sha256.to_string(),
                model: scored.model.to_string(),
                looked: looked.join(", "),
            })
        }
    };
    if configs.is_empty() {
        // A version served without a config.yaml: the archive has no config for it.
        let folder = file.parent().map(Path::to_path_buf).unwrap_or_default();
        configs.push(Config {
            name: "the default config (no config.yaml)".into(),
            folder,
            config: Ok(ModelConfig::default()),
        });
    }
    Ok(Located { file, place, configs })
}

/// The version of the record's model in the repository whose file has the recorded sha256: the
/// recorded version first, then the others.
fn find_in_repository(root: &Path, scored: &Scored<'_>) -> Option<(u64, PathBuf)> {
    let mut files = repository::version_files(root, scored.model).ok()?;
    // Stable sort on a bool: the recorded version first, the others in version order.
    files.sort_by_key(|(version, _)| Some(*version) != scored.version);
    files.into_iter().find(|(_, file)| file_sha256(file).is_ok_and(|sha| sha == scored.model_sha256))
}

/// Every config the archive holds beside a model file, by name.
fn archived_configs(folder: &Path) -> Vec<Config> {
    let Ok(entries) = std::fs::read_dir(folder) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| archive::is_config_name(name))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = folder.join(&name);
            let config = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| ModelConfig::from_yaml(&text).map_err(|e| e.to_string()));
            Config { name: path.display().to_string(), folder: folder.to_path_buf(), config }
        })
        .collect()
}

fn file_sha256(path: &Path) -> Result<String, std::io::Error> {
    let mut file = std::fs::File::open(path)?;
    let mut digest = Sha256::new();
    std::io::copy(&mut file, &mut digest)?;
    Ok(format!("{:x}", digest.finalize()))
}

/// The model loaded under the config that gives the recorded inputs digest, and the job's rows.
struct Bound {
    model: ModelVersion,
    inputs: Vec<f32>,
    config: String,
}

/// Loads the model file under each candidate config until one lays the job's rows out as they
/// were recorded.
fn bind(
    env: &ort::environment::Environment,
    settings: &Settings,
    scored: &Scored<'_>,
    located: &Located,
    request: &JobRequest,
) -> Result<Bound, ReproduceError> {
    let mut problems = Vec::new();
    let mut computed = None;
    for candidate in &located.configs {
        let model = match load(env, settings, scored, &located.file, candidate) {
            Ok(model) => model,
            Err(problem) => {
                problems.push(format!("{}: {problem}", candidate.name));
                continue;
            }
        };
        if model.sha256 != scored.model_sha256 {
            return Err(ReproduceError::ModelDigest {
                path: located.file.clone(),
                recorded: scored.model_sha256.to_string(),
                actual: model.sha256.clone(),
            });
        }
        let inputs = match job::bind(request.features.clone(), &model) {
            Ok(inputs) => inputs,
            Err(rejection) => {
                problems.push(format!(
                    "{}: the worker would not score the job: {}",
                    candidate.name,
                    rejection.message()
                ));
                continue;
            }
        };
        let digest = audit::hex(audit::inputs(&inputs, model.signature.n_features, false).sha256);
        if digest == scored.inputs_sha256 {
            return Ok(Bound { model, inputs, config: candidate.name.clone() });
        }
        computed.get_or_insert(digest);
    }
    match computed {
        Some(computed) => Err(ReproduceError::InputsDigest { recorded: scored.inputs_sha256.to_string(), computed }),
        None if problems.iter().any(|p| p.contains("would not score")) => {
            Err(ReproduceError::NotTheJob { problem: problems.join("; ") })
        }
        None => Err(ReproduceError::ModelUnloadable {
            path: located.file.clone(),
            sha256: scored.model_sha256.to_string(),
            problems: problems.join("; "),
        }),
    }
}

/// The model file under `candidate`, on the CPU with one session, whatever the settings and the
/// config say: the reproduction must run where any auditor can run it.
fn load(
    env: &ort::environment::Environment,
    settings: &Settings,
    scored: &Scored<'_>,
    file: &Path,
    candidate: &Config,
) -> Result<ModelVersion, String> {
    let mut config = candidate.config.clone()?;
    config.execution_provider = Some(ExecutionProvider::Cpu);
    let inference = InferenceSettings {
        sessions: 1,
        execution_provider: ExecutionProvider::Cpu,
        engine: Engine::OnnxRuntime,
        ..settings.inference
    };
    let version = scored.version.unwrap_or_default();
    ModelVersion::load_from(env, scored.model, version, file, &candidate.folder, &config, inference, settings.batching)
        .map_err(|e| e.to_string())
}

/// How the outputs scored again compare with the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The outputs are the recorded bytes (their sha256 is the recorded `outputs_sha256`).
    pub identical: bool,
    /// The record holds only the digest, so nothing finer than identical or not can be said.
    pub digest_only: bool,
    /// Each output, in the order of the outputs scored again.
    pub outputs: Vec<OutputComparison>,
    /// Recorded tensors that are not model outputs (an explained protocol job's `contributions`
    /// and `reasons`), which are not reproduced.
    pub not_reproduced: Vec<String>,
}

/// One output against its recorded values.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputComparison {
    pub name: String,
    /// The largest absolute difference of a number of the output.
    pub max_difference: f64,
    /// What differs beyond the tolerance, or in structure; `None`: equal within tolerance.
    pub difference: Option<String>,
}

impl Comparison {
    /// The job is reproduced: the bytes are identical, or every output is equal within tolerance.
    pub fn reproduced(&self) -> bool {
        self.identical || (!self.digest_only && self.outputs.iter().all(|o| o.difference.is_none()))
    }
}

/// Compares the outputs scored again (`outputs`, as the worker writes them) with the record's.
fn compare(scored: &Scored<'_>, outputs: &[u8], explained: bool) -> Comparison {
    let digest = format!("{:x}", Sha256::digest(outputs));
    let identical = digest == scored.outputs_sha256 && scored.outputs.is_none_or(|o| o.get().as_bytes() == outputs);
    let mut comparison = Comparison {
        identical,
        digest_only: scored.outputs.is_none(),
        outputs: Vec::new(),
        not_reproduced: Vec::new(),
    };
    let (Some(recorded), Ok(again)) = (scored.outputs, serde_json::from_slice::<Value>(outputs)) else {
        return comparison;
    };
    let recorded: Value = match serde_json::from_str(recorded.get()) {
        Ok(value) => value,
        Err(error) => {
            comparison.outputs.push(OutputComparison {
                name: "outputs".into(),
                max_difference: f64::NAN,
                difference: Some(format!("the record's outputs are not JSON: {error}")),
            });
            return comparison;
        }
    };
    let mut recorded = by_output(&recorded);
    for (name, value) in by_output(&again) {
        let output = match recorded.iter().position(|(n, _)| *n == name) {
            Some(at) => {
                let (_, before) = recorded.remove(at);
                let mut difference = Difference::default();
                difference.walk(value, before, &name);
                OutputComparison { name, max_difference: difference.max, difference: difference.first }
            }
            None => OutputComparison {
                name,
                max_difference: f64::NAN,
                difference: Some("the record has no such output".into()),
            },
        };
        comparison.outputs.push(output);
    }
    for (name, _) in recorded {
        // An explained protocol job's results carry its explanations among the output tensors.
        if explained && matches!(name.as_str(), "contributions" | "reasons") {
            comparison.not_reproduced.push(name);
        } else {
            comparison.outputs.push(OutputComparison {
                name,
                max_difference: f64::NAN,
                difference: Some("recorded, but not among the outputs scored again".into()),
            });
        }
    }
    comparison
}

/// The outputs of a result's `outputs` member by name: an object by output name (native form),
/// or an array of tensors with a `name` each (protocol form).
fn by_output(outputs: &Value) -> Vec<(String, &Value)> {
    match outputs {
        Value::Object(map) => map.iter().map(|(name, value)| (name.clone(), value)).collect(),
        Value::Array(tensors) => tensors
            .iter()
            .enumerate()
            .map(|(i, tensor)| (tensor["name"].as_str().map_or_else(|| format!("[{i}]"), str::to_string), tensor))
            .collect(),
        other => vec![(String::from("outputs"), other)],
    }
}

/// The largest difference between two JSON values' numbers, and the first place they differ
/// beyond tolerance or in structure.
#[derive(Default)]
struct Difference {
    max: f64,
    first: Option<String>,
}

impl Difference {
    fn walk(&mut self, again: &Value, recorded: &Value, at: &str) {
        match (again, recorded) {
            (Value::Number(a), Value::Number(r)) => {
                let (a, r) = (a.as_f64().unwrap_or(f64::NAN), r.as_f64().unwrap_or(f64::NAN));
                let difference = (a - r).abs();
                self.max = self.max.max(difference);
                if !within_tolerance(a, r) {
                    self.differs(|| format!("{at}: {a} scored again, {r} recorded"));
                }
            }
            (Value::Array(a), Value::Array(r)) if a.len() == r.len() => {
                for (i, (a, r)) in a.iter().zip(r).enumerate() {
                    self.walk(a, r, &format!("{at}[{i}]"));
                }
            }
            (Value::Object(a), Value::Object(r)) if a.len() == r.len() => {
                for (key, a) in a {
                    match r.get(key) {
                        Some(r) => self.walk(a, r, &format!("{at}.{key}")),
                        None => self.differs(|| format!("{at}: {key} scored again, not recorded")),
                    }
                }
            }
            (a, r) if a == r => {}
            (a, r) => self.differs(|| format!("{at}: {} scored again, {} recorded", shorten(a), shorten(r))),
        }
    }

    fn differs(&mut self, place: impl FnOnce() -> String) {
        if self.first.is_none() {
            self.first = Some(place());
        }
    }
}

/// Two scores are equal within [`ABSOLUTE_TOLERANCE`] or [`RELATIVE_TOLERANCE`].
pub fn within_tolerance(a: f64, b: f64) -> bool {
    let difference = (a - b).abs();
    difference <= ABSOLUTE_TOLERANCE || difference <= RELATIVE_TOLERANCE * a.abs().max(b.abs())
}

/// A difference for the report: `0`, `n/a` where numbers could not be compared, else `1.19e-7`.
fn shown(difference: f64) -> String {
    if difference == 0.0 {
        "0".into()
    } else if difference.is_nan() {
        "n/a".into()
    } else {
        format!("{difference:.2e}")
    }
}

fn shorten(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// What a reproduction found.
#[derive(Debug)]
pub struct Report {
    pub job_id: String,
    pub model: String,
    pub version: Option<u64>,
    pub sha256: String,
    pub place: Place,
    pub file: PathBuf,
    /// The config the rows were laid out and scored under.
    pub config: String,
    pub inputs_sha256: String,
    pub rows: usize,
    pub features: usize,
    pub comparison: Comparison,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = self.version.map_or_else(|| "(none recorded)".to_string(), |v| v.to_string());
        writeln!(f, "job:      {}", self.job_id)?;
        writeln!(f, "model:    {} version {version}", self.model)?;
        writeln!(f, "sha256:   {}", self.sha256)?;
        match &self.place {
            Place::Repository { version } => {
                writeln!(f, "file:     {} (in the repository, version {version})", self.file.display())?
            }
            Place::Archive => writeln!(f, "file:     {} (in the model archive)", self.file.display())?,
        }
        writeln!(f, "config:   {}", self.config)?;
        writeln!(f, "inputs:   sha256 {} OK ({} rows of {} features)", self.inputs_sha256, self.rows, self.features)?;
        let comparison = &self.comparison;
        for output in &comparison.outputs {
            match &output.difference {
                None => writeln!(
                    f,
                    "output {}: equal, max absolute difference {}",
                    output.name,
                    shown(output.max_difference)
                )?,
                Some(what) => writeln!(
                    f,
                    "output {}: DIFFERS, max absolute difference {}; first difference at {what}",
                    output.name,
                    shown(output.max_difference)
                )?,
            }
        }
        for name in &comparison.not_reproduced {
            writeln!(f, "output {name}: not compared (explanations are not reproduced)")?;
        }
        let verdict = if comparison.identical {
            "reproduced: the outputs are the recorded bytes".to_string()
        } else if comparison.digest_only {
            "NOT reproduced: the outputs' sha256 differs from the recorded outputs_sha256, and the record holds no \
             outputs to compare the numbers with (audit.include_outputs: false)"
                .to_string()
        } else if comparison.reproduced() {
            format!(
                "reproduced: the outputs are equal within tolerance (absolute {ABSOLUTE_TOLERANCE:e} or relative \
                 {RELATIVE_TOLERANCE:e}), not byte for byte"
            )
        } else {
            "NOT reproduced: the outputs differ from the record".to_string()
        };
        write!(f, "verdict:  {verdict}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outputs: Option<&str>, digest_of: &str) -> Recorded {
        Recorded {
            job_id: Some("j".into()),
            status: "ok".into(),
            model: Some("m".into()),
            version: Some(1),
            model_sha256: Some("a".repeat(64)),
            inputs_sha256: Some("b".repeat(64)),
            outputs: outputs.map(|o| RawValue::from_string(o.to_string()).expect("JSON")),
            outputs_sha256: Some(format!("{:x}", Sha256::digest(digest_of.as_bytes()))),
        }
    }

    fn compared(record: &Recorded, again: &str, explained: bool) -> Comparison {
        compare(&record.scored().expect("a scored job"), again.as_bytes(), explained)
    }

    #[test]
    fn the_recorded_bytes_are_identical() {
        let text = r#"{"label":[1],"probabilities":[[0.25,0.75]]}"#;
        let comparison = compared(&record(Some(text), text), text, false);
        assert!(comparison.identical && comparison.reproduced(), "{comparison:?}");
        assert_eq!(comparison.outputs.iter().map(|o| o.max_difference).sum::<f64>(), 0.0);
    }

    #[test]
    fn last_bit_differences_are_equal_within_tolerance_and_larger_ones_are_not() {
        let recorded = r#"{"label":[1],"probabilities":[[0.25,0.75]]}"#;
        let last_bits = r#"{"label":[1],"probabilities":[[0.25000003,0.74999997]]}"#;
        let comparison = compared(&record(Some(recorded), recorded), last_bits, false);
        assert!(!comparison.identical && comparison.reproduced(), "{comparison:?}");
        let probabilities = &comparison.outputs[1];
        assert!(probabilities.max_difference > 0.0 && probabilities.max_difference < 1e-7, "{probabilities:?}");

        let other = r#"{"label":[0],"probabilities":[[0.26,0.74]]}"#;
        let comparison = compared(&record(Some(recorded), recorded), other, false);
        assert!(!comparison.reproduced(), "{comparison:?}");
        assert_eq!(comparison.outputs[0].difference.as_deref(), Some("label[0]: 0 scored again, 1 recorded"));
        assert!((comparison.outputs[1].max_difference - 0.01).abs() < 1e-9, "{comparison:?}");
    }

    #[test]
    fn a_digest_alone_tells_identical_or_not() {
        let text = r#"{"y":[0.5]}"#;
        assert!(compared(&record(None, text), text, false).reproduced());
        let comparison = compared(&record(None, text), r#"{"y":[0.50000006]}"#, false);
        assert!(comparison.digest_only && !comparison.reproduced(), "{comparison:?}");
    }

    #[test]
    fn protocol_tensors_compare_by_name_and_explanations_are_set_aside() {
        let tensor =
            |name: &str, data: &str| format!(r#"{{"name":"{name}","shape":[1],"datatype":"FP32","data":{data}}}"#);
        let recorded = format!("[{},{}]", tensor("y", "[0.5]"), tensor("contributions", "[0.1]"));
        let again = format!("[{}]", tensor("y", "[0.5]"));
        let comparison = compared(&record(Some(&recorded), &recorded), &again, true);
        assert!(comparison.reproduced(), "{comparison:?}");
        assert_eq!(comparison.not_reproduced, vec!["contributions".to_string()]);
        let comparison = compared(&record(Some(&recorded), &recorded), &again, false);
        assert!(!comparison.reproduced(), "a job that asked for no explanation has no extra tensor: {comparison:?}");
    }

    #[test]
    fn a_job_is_decoded_with_the_id_and_model_its_message_gave() {
        let record = record(None, "");
        let scored = record.scored().expect("scored");
        let protocol = br#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#;
        let request = decode(protocol, &scored).expect("the x-model header named the model");
        assert_eq!((request.job_id.as_str(), request.model.as_str()), ("j", "m"));
        let native = decode(br#"{"model":"m","rows":[[1,2]]}"#, &scored).expect("the message_id named the job");
        assert_eq!(native.features.row_count(), 1);
        let other = decode(br#"{"job_id":"k","model":"m","rows":[[1]]}"#, &scored).expect_err("another job");
        assert!(other.to_string().contains(r#"it is job "k", the record is of job "j""#), "{other}");
        let unreadable = decode(br#"{"job_id":"j","model":"m","rows":[["x"]]}"#, &scored).expect_err("bad value");
        assert!(!unreadable.is_setup() && unreadable.to_string().contains("rows[0][0]"), "{unreadable}");
    }

    #[test]
    fn a_record_of_an_error_has_nothing_to_reproduce() {
        let mut error = record(None, "");
        error.status = "error".into();
        let refused = error.scored().err().expect("nothing to reproduce");
        assert!(refused.is_setup() && refused.to_string().contains("answered with an error"), "{refused}");
    }

    #[test]
    fn the_tolerance_is_absolute_or_relative() {
        assert!(within_tolerance(1e-7, 0.0) && within_tolerance(1000.0, 1000.005));
        assert!(!within_tolerance(0.5, 0.500_01) && !within_tolerance(1000.0, 1000.02));
    }
}

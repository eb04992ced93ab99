//! The `inspect` and `models` commands: a model file's inputs and outputs, and whether the
//! worker can serve it; every model version in the repository and which one serves.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use ort::value::ValueType;

use crate::engine::model::{open_session, read_signature, ModelConfig};
use crate::engine::outputs::{Element, MapKeyType, OutputKind};
use crate::engine::{runtime, Repository};
use crate::explain::Explainer;
use crate::settings::Settings;

/// A model file `inspect` cannot open: the command's input must change.
#[derive(Debug, thiserror::Error)]
#[error("cannot load {}: {reason}; inspect takes an ONNX model file, e.g. models/<model>/<version>/model.onnx", path.display())]
pub struct UnloadableModel {
    path: PathBuf,
    reason: String,
}

/// Describes `path` as text, ready to print.
pub fn describe(settings: &Settings, path: &Path) -> anyhow::Result<String> {
    let env = runtime::environment(settings.onnxruntime.library_path.as_deref())?;
    let session = open_session(env, path, settings.inference)
        .map_err(|reason| UnloadableModel { path: path.to_path_buf(), reason })?
        .session;
    let mut text = String::new();
    writeln!(text, "model: {}", path.display())?;
    for (heading, outlets) in [("inputs", session.inputs()), ("outputs", session.outputs())] {
        writeln!(text, "{heading}:")?;
        for outlet in outlets {
            writeln!(text, "  {:<24} {}", outlet.name(), describe_type(outlet.dtype()))?;
        }
    }
    match read_signature(&session, None) {
        Ok(signature) => {
            writeln!(text, "servable: yes ({} features per row)", signature.n_features)?;
            writeln!(text, "explain: {}", explanation_method(path, signature.n_features))?;
        }
        Err(reason) => writeln!(text, "servable: no: {reason}")?,
    }
    Ok(text)
}

/// How the model's scores are explained, as its folder's config.yaml (`<model>/config.yaml` for
/// `<model>/<version>/model.onnx`) sets it, and why.
fn explanation_method(path: &Path, n_features: usize) -> String {
    let Some(folder) = path.parent().and_then(Path::parent) else { return "no (no config.yaml)".into() };
    let config = match std::fs::read_to_string(folder.join("config.yaml")) {
        Ok(text) => ModelConfig::from_yaml(&text),
        Err(_) => return format!("no ({} has no config.yaml)", folder.display()),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => return format!("no: {}: {e}", folder.join("config.yaml").display()),
    };
    let Some(explain) = &config.explain else { return "no (config.yaml has no explain section)".into() };
    let built = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| Explainer::build(explain, &bytes, folder, config.features.as_deref(), n_features));
    match built {
        Ok(explainer) => format!("method {}: {}", explainer.method.name(), explainer.reason),
        Err(e) => format!("no: config.yaml {e}"),
    }
}

fn describe_type(dtype: &ValueType) -> String {
    match dtype {
        ValueType::Tensor { ty, shape, .. } => {
            let dims: Vec<String> = shape.iter().map(|&d| if d < 0 { "?".into() } else { d.to_string() }).collect();
            format!("tensor {ty} [{}]", dims.join(", "))
        }
        other => other.to_string(),
    }
}

/// The repository as a table: one line per model version, the serving one marked.
pub fn list_models(settings: &Settings) -> anyhow::Result<String> {
    let env = runtime::environment(settings.onnxruntime.library_path.as_deref())?;
    // Listing writes nothing: the archive is the serving workers' to fill.
    let mut listing = settings.clone();
    listing.models.archive = None;
    let repository = Repository::load(env, &listing)?;
    let mut text = String::new();
    writeln!(
        text,
        "{:<20} {:>7}  {:<7} {:>8}  {:<44} {:<8} {:<8} SHA256",
        "MODEL", "VERSION", "SERVING", "FEATURES", "OUTPUTS", "PROVIDER", "EXPLAIN"
    )?;
    for model in repository.versions() {
        let serving = repository.resolve(&model.name, None).is_ok_and(|latest| latest.version == model.version);
        let outputs: Vec<String> =
            model.published.iter().map(|o| format!("{} {}", o.name, describe_kind(&o.kind))).collect();
        writeln!(
            text,
            "{:<20} {:>7}  {:<7} {:>8}  {:<44} {:<8} {:<8} {}",
            model.name,
            model.version,
            if serving { "yes" } else { "no" },
            model.signature.n_features,
            outputs.join(", "),
            model.provider.as_str(),
            model.explainer.as_ref().map_or("-", |e| e.method.name()),
            model.sha256
        )?;
    }
    Ok(text)
}

fn describe_kind(kind: &OutputKind) -> String {
    match kind {
        OutputKind::Tensor { element, row_shape } => {
            let element = match element {
                Element::F32 => "f32",
                Element::F64 => "f64",
                Element::I64 => "i64",
                Element::I32 => "i32",
                Element::Bool => "bool",
                Element::Str => "string",
            };
            let dims: Vec<String> = row_shape.iter().map(usize::to_string).collect();
            if dims.is_empty() {
                element.to_string()
            } else {
                format!("{element}[{}]", dims.join(","))
            }
        }
        OutputKind::MapSequence { key: MapKeyType::I64 } => "map<i64,f32>".into(),
        OutputKind::MapSequence { key: MapKeyType::Str } => "map<string,f32>".into(),
    }
}

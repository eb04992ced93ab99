//! The `inspect` command: a model file's inputs and outputs, and whether the worker can serve it.

use std::fmt::Write;
use std::path::Path;

use ort::value::ValueType;

use crate::engine::model::{open_session, read_signature};
use crate::engine::runtime;
use crate::settings::Settings;

/// Describes `path` as text, ready to print.
pub fn describe(settings: &Settings, path: &Path) -> anyhow::Result<String> {
    let env = runtime::environment(settings.onnxruntime.library_path.as_deref())?;
    let session = open_session(env, path, settings.inference)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?;
    let mut text = String::new();
    writeln!(text, "model: {}", path.display())?;
    for (heading, outlets) in [("inputs", session.inputs()), ("outputs", session.outputs())] {
        writeln!(text, "{heading}:")?;
        for outlet in outlets {
            writeln!(text, "  {:<24} {}", outlet.name(), describe_type(outlet.dtype()))?;
        }
    }
    match read_signature(&session, None) {
        Ok(signature) => writeln!(text, "servable: yes ({} features per row)", signature.n_features)?,
        Err(reason) => writeln!(text, "servable: no: {reason}")?,
    }
    Ok(text)
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

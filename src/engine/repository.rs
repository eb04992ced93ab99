//! The model repository on disk (`<repository>/<model>/<version>/model.onnx` plus an optional
//! `<model>/config.yaml`) and the lookup of the version that serves a job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::model::{ModelConfig, ModelError, ModelVersion};
use crate::settings::Settings;

pub const MODEL_FILE: &str = "model.onnx";
pub const CONFIG_FILE: &str = "config.yaml";

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("model repository {path} cannot be read: {source}; set models.repository to the folder holding <model>/<version>/model.onnx")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("model repository {0} holds no model (expected <model>/<version>/model.onnx)")]
    Empty(PathBuf),
    #[error("{path}: {problem}")]
    Config { path: PathBuf, problem: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Why a job's model could not be resolved: answered with `unknown_model`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("model {model:?} is not in the repository (available: {available})")]
    UnknownModel { model: String, available: String },
    #[error("model {model:?} has no version {version} (available: {available})")]
    UnknownVersion { model: String, version: u64, available: String },
}

/// Every loaded version of every model, immutable once built.
#[derive(Debug, Default)]
pub struct Repository {
    models: BTreeMap<String, BTreeMap<u64, Arc<ModelVersion>>>,
}

impl Repository {
    /// Loads every version found under `settings.models.repository`.
    pub fn load(env: &ort::environment::Environment, settings: &Settings) -> Result<Self, RepositoryError> {
        let root = &settings.models.repository;
        let mut models = BTreeMap::new();
        for (name, dir) in subdirectories(root)? {
            let config = read_config(&dir)?;
            let mut versions = BTreeMap::new();
            for (version_name, version_dir) in subdirectories(&dir)? {
                let Ok(version) = version_name.parse::<u64>() else { continue };
                let file = version_dir.join(MODEL_FILE);
                if !file.is_file() {
                    continue;
                }
                let model =
                    ModelVersion::load(env, &name, version, &file, &config, settings.inference, settings.batching)
                        .inspect_err(|_| crate::telemetry::record_model_load_failure(&name))?;
                tracing::info!(model = %name, version, path = %file.display(), sha256 = %model.sha256,
                    features = model.signature.n_features, "model loaded");
                crate::telemetry::record_model_loaded(&name, version, &model.sha256);
                let (busy, idle) = model.session_usage();
                crate::telemetry::record_sessions(&name, version, busy, idle);
                versions.insert(version, Arc::new(model));
            }
            if !versions.is_empty() {
                models.insert(name, versions);
            }
        }
        if models.is_empty() {
            return Err(RepositoryError::Empty(root.clone()));
        }
        Ok(Self { models })
    }

    /// The pinned version, or the highest one.
    pub fn resolve(&self, model: &str, version: Option<u64>) -> Result<&Arc<ModelVersion>, LookupError> {
        let Some(versions) = self.models.get(model) else {
            return Err(LookupError::UnknownModel { model: model.to_string(), available: self.names().join(", ") });
        };
        let found = match version {
            Some(v) => versions.get(&v),
            None => versions.values().next_back(),
        };
        found.ok_or_else(|| LookupError::UnknownVersion {
            model: model.to_string(),
            version: version.unwrap_or_default(),
            available: versions.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
        })
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }

    pub fn versions(&self) -> impl Iterator<Item = &Arc<ModelVersion>> {
        self.models.values().flat_map(|v| v.values())
    }
}

fn subdirectories(dir: &Path) -> Result<Vec<(String, PathBuf)>, RepositoryError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| RepositoryError::Unreadable { path: dir.to_path_buf(), source })?;
    let mut found: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    found.sort();
    Ok(found)
}

fn read_config(model_dir: &Path) -> Result<ModelConfig, RepositoryError> {
    let path = model_dir.join(CONFIG_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_yaml::from_str(&text).map_err(|e| RepositoryError::Config { path, problem: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelConfig::default()),
        Err(e) => Err(RepositoryError::Config { path, problem: e.to_string() }),
    }
}

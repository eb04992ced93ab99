//! The model repository on disk (`<repository>/<model>/<version>/model.onnx` plus an optional
//! `<model>/config.yaml`) and the lookup of the version that serves a job.
//!
//! A [`Repository`] is an immutable snapshot. [`Repository::reload`] builds the next snapshot
//! from the disk, reusing every version whose files did not change, so a reload only pays for
//! what is new. With `models.archive` set, every version loaded is also kept in the model
//! [`archive`](super::archive).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::archive::{self, Baseline};
use super::model::{ModelConfig, ModelError, ModelVersion};
use crate::settings::Settings;
use crate::telemetry;

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

/// Size and modification time of a version's model file and of its model's config.yaml: when
/// neither changed, the loaded version is still what the disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    model: (u64, Option<SystemTime>),
    /// config.yaml and the explanation baseline file it names, if any.
    config: Option<(u64, Option<SystemTime>)>,
    baseline: Option<(u64, Option<SystemTime>)>,
}

impl Stamp {
    fn of(model_file: &Path, config_file: &Path, baseline_file: Option<&Path>) -> Option<Self> {
        let read = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()));
        Some(Self { model: read(model_file)?, config: read(config_file), baseline: baseline_file.and_then(read) })
    }
}

/// A version as found on disk.
struct Candidate {
    name: String,
    version: u64,
    file: PathBuf,
    config: Arc<ModelConfig>,
    /// The config.yaml text `config` was read from, kept for the archive; `None` without one.
    config_text: Option<Arc<str>>,
    /// The explanation baseline file config.yaml names: that name, and the file.
    baseline: Option<(PathBuf, PathBuf)>,
    stamp: Stamp,
}

/// Every served version of every model.
#[derive(Debug, Default)]
pub struct Repository {
    models: BTreeMap<String, BTreeMap<u64, Served>>,
}

#[derive(Debug, Clone)]
struct Served {
    model: Arc<ModelVersion>,
    stamp: Stamp,
}

/// Versions that failed to load, by their files' stamp: they are retried only once changed.
pub type Refused = HashMap<(String, u64), Stamp>;

impl Repository {
    /// Loads every version the models' version policies select; any failure is an error.
    pub fn load(env: &ort::environment::Environment, settings: &Settings) -> Result<Self, RepositoryError> {
        let mut models: BTreeMap<String, BTreeMap<u64, Served>> = BTreeMap::new();
        for candidate in scan(&settings.models.repository)? {
            let model = load_version(env, settings, &candidate)?;
            let served = Served { model, stamp: candidate.stamp };
            models.entry(candidate.name).or_default().insert(candidate.version, served);
        }
        if models.is_empty() {
            return Err(RepositoryError::Empty(settings.models.repository.clone()));
        }
        let repository = Self { models };
        // Only once every version loaded: a worker that fails to start serves nothing.
        repository.versions().for_each(|model| record_serving(model));
        Ok(repository)
    }

    /// The next snapshot, or `None` when nothing changed. A version that fails to load is logged,
    /// counted in `batchscore_model_load_failures_total` and left out, while the version it would
    /// have replaced keeps serving. A repository that cannot be read, or that would leave nothing
    /// to serve, keeps the current snapshot.
    ///
    /// `batchscore_model_info` follows the snapshot returned: versions are marked retired and
    /// serving only when a next snapshot is returned, so the metric never names a version the
    /// worker does not serve, nor calls retired one that still serves.
    pub fn reload(
        &self,
        env: &ort::environment::Environment,
        settings: &Settings,
        refused: &mut Refused,
    ) -> Result<Option<Self>, RepositoryError> {
        let candidates = scan(&settings.models.repository)?;
        let mut models: BTreeMap<String, BTreeMap<u64, Served>> = BTreeMap::new();
        // A file or config.yaml changed, even when the loaded version stays (the stamps move on).
        let mut restamped = false;
        for candidate in candidates {
            let current = self.models.get(&candidate.name).and_then(|v| v.get(&candidate.version));
            let key = (candidate.name.clone(), candidate.version);
            let served = match current {
                Some(served) if served.stamp == candidate.stamp => {
                    // Files that could not be archived before are tried again at every reload.
                    archive_version(settings, &candidate, &served.model.sha256);
                    Some(served.clone())
                }
                _ if refused.get(&key) == Some(&candidate.stamp) => current.cloned(),
                _ => match load_version(env, settings, &candidate) {
                    Ok(model) => {
                        refused.remove(&key);
                        restamped = true;
                        match current {
                            // Same bytes and the same config.yaml under a new timestamp: the loaded
                            // version stays. An edited config.yaml (features, outputs, batching,
                            // provider, explain) or baseline file needs the version loaded with it.
                            Some(served)
                                if served.model.sha256 == model.sha256
                                    && served.stamp.config == candidate.stamp.config
                                    && served.stamp.baseline == candidate.stamp.baseline =>
                            {
                                Some(Served { model: Arc::clone(&served.model), stamp: candidate.stamp })
                            }
                            _ => Some(Served { model, stamp: candidate.stamp }),
                        }
                    }
                    Err(error) => {
                        tracing::error!(model = %candidate.name, version = candidate.version, %error,
                            serving = current.map(|s| s.model.sha256.as_str()).unwrap_or("nothing"),
                            "model version refused; the served versions stay as they are");
                        refused.insert(key, candidate.stamp);
                        current.cloned()
                    }
                },
            };
            if let Some(served) = served {
                models.entry(candidate.name).or_default().insert(candidate.version, served);
            }
        }
        if models.is_empty() {
            tracing::error!(path = %settings.models.repository.display(),
                "the model repository holds no servable model; the served versions stay as they are");
            return Ok(None);
        }
        let next = Self { models };
        let retired: Vec<&Arc<ModelVersion>> = self.versions().filter(|old| !next.serves(old)).collect();
        let added: Vec<&Arc<ModelVersion>> = next.versions().filter(|new| !self.serves(new)).collect();
        if !restamped && retired.is_empty() && added.is_empty() {
            return Ok(None);
        }
        // Retired first: a version loaded again with the same file and provider shares the
        // retired one's labels and must end up marked as serving.
        for old in retired {
            tracing::info!(model = %old.name, version = old.version, sha256 = %old.sha256,
                "model version retired; it finishes the batches it has");
            telemetry::record_model_retired(&old.name, old.version, &old.sha256, old.provider.as_str());
        }
        added.into_iter().for_each(|model| record_serving(model));
        Ok(Some(next))
    }

    /// This very load of a version (not another load of the same file) is in the snapshot.
    fn serves(&self, model: &Arc<ModelVersion>) -> bool {
        self.models
            .get(&model.name)
            .and_then(|versions| versions.get(&model.version))
            .is_some_and(|served| Arc::ptr_eq(&served.model, model))
    }

    /// The pinned version, or the highest one.
    pub fn resolve(&self, model: &str, version: Option<u64>) -> Result<&Arc<ModelVersion>, LookupError> {
        self.resolve_visible(model, version, |_| true)
    }

    /// [`Repository::resolve`] for a client who may see only the models `visible` accepts (its
    /// highest version decides): a failed lookup lists only those, so that a publisher learns
    /// nothing of models it may not score from a misspelt name.
    pub fn resolve_visible(
        &self,
        model: &str,
        version: Option<u64>,
        visible: impl Fn(&ModelVersion) -> bool,
    ) -> Result<&Arc<ModelVersion>, LookupError> {
        let newest_visible =
            |versions: &BTreeMap<u64, Served>| versions.values().next_back().is_some_and(|s| visible(&s.model));
        let Some(versions) = self.models.get(model) else {
            let names: Vec<&str> =
                self.models.iter().filter(|(_, v)| newest_visible(v)).map(|(name, _)| name.as_str()).collect();
            let available = if names.is_empty() { "none".to_string() } else { names.join(", ") };
            return Err(LookupError::UnknownModel { model: model.to_string(), available });
        };
        let found = match version {
            Some(v) => versions.get(&v),
            None => versions.values().next_back(),
        };
        found.map(|served| &served.model).ok_or_else(|| LookupError::UnknownVersion {
            model: model.to_string(),
            version: version.unwrap_or_default(),
            available: match newest_visible(versions) {
                true => versions.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
                false => "none".to_string(),
            },
        })
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }

    pub fn versions(&self) -> impl Iterator<Item = &Arc<ModelVersion>> {
        self.models.values().flat_map(|v| v.values().map(|served| &served.model))
    }
}

fn load_version(
    env: &ort::environment::Environment,
    settings: &Settings,
    candidate: &Candidate,
) -> Result<Arc<ModelVersion>, RepositoryError> {
    let Candidate { name, version, file, config, .. } = candidate;
    let model = ModelVersion::load(env, name, *version, file, config, settings.inference, settings.batching)
        .inspect_err(|_| telemetry::record_model_load_failure(name))?;
    tracing::info!(model = %name, version, path = %file.display(), sha256 = %model.sha256,
        features = model.signature.n_features, provider = model.provider.as_str(),
        explain = model.explainer.as_ref().map_or("no", |e| e.method.name()), "model loaded");
    if let Some(explainer) = &model.explainer {
        tracing::info!(model = %name, version, method = explainer.method.name(), why = %explainer.reason,
            "explanations enabled");
    }
    archive_version(settings, candidate, &model.sha256);
    Ok(Arc::new(model))
}

/// Keeps the files of a version that loaded as `sha256` in `models.archive`, when set. A failure
/// does not stop the version serving, but is logged as an error and counted: until it is fixed,
/// reproducing that version's scores depends on the repository still holding it.
fn archive_version(settings: &Settings, candidate: &Candidate, sha256: &str) {
    let Some(folder) = settings.models.archive() else { return };
    let version = archive::Version {
        sha256,
        model_file: &candidate.file,
        config: candidate.config_text.as_deref().map(str::as_bytes),
        baseline: candidate.baseline.as_ref().map(|(name, file)| Baseline { name, file }),
    };
    match archive::store(folder, &version) {
        Ok(_) => telemetry::record_model_archived(&candidate.name),
        Err(error) => {
            telemetry::record_model_archive_failure(&candidate.name);
            tracing::error!(model = %candidate.name, version = candidate.version, sha256,
                archive = %archive::folder(folder, sha256).display(), %error,
                "model version not archived; it serves, but reproducing its scores depends on the repository \
                 keeping it until the archive has it (retried at every reload)");
        }
    }
}

/// A version entered the served snapshot.
fn record_serving(model: &ModelVersion) {
    telemetry::record_model_loaded(&model.name, model.version, &model.sha256, model.provider.as_str());
    let (busy, idle) = model.session_usage();
    telemetry::record_sessions(&model.name, model.version, busy, idle);
}

/// Every version on disk that its model's version policy selects.
fn scan(root: &Path) -> Result<Vec<Candidate>, RepositoryError> {
    let mut found = Vec::new();
    for (name, dir) in subdirectories(root)? {
        let (config, config_text) = read_config(&dir)?;
        let (config, config_text) = (Arc::new(config), config_text.map(Arc::from));
        let config_file = dir.join(CONFIG_FILE);
        let baseline_name = config.explain.as_ref().and_then(|e| e.baseline_file.clone());
        let baseline_file = baseline_name.as_ref().map(|f| dir.join(f));
        let mut on_disk = BTreeMap::new();
        for (version_name, version_dir) in subdirectories(&dir)? {
            let Ok(version) = version_name.parse::<u64>() else { continue };
            let file = version_dir.join(MODEL_FILE);
            if let Some(stamp) =
                file.is_file().then(|| Stamp::of(&file, &config_file, baseline_file.as_deref())).flatten()
            {
                on_disk.insert(version, (file, stamp));
            }
        }
        let available: Vec<u64> = on_disk.keys().copied().collect();
        for version in config.version_policy.select(&available) {
            if let Some((file, stamp)) = on_disk.remove(&version) {
                found.push(Candidate {
                    name: name.clone(),
                    version,
                    file,
                    config: Arc::clone(&config),
                    config_text: config_text.clone(),
                    baseline: baseline_name.clone().zip(baseline_file.clone()),
                    stamp,
                });
            }
        }
    }
    Ok(found)
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

/// A model's config.yaml, read and as written (`None` without one: the default config).
pub fn read_config(model_dir: &Path) -> Result<(ModelConfig, Option<String>), RepositoryError> {
    let path = model_dir.join(CONFIG_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => ModelConfig::from_yaml(&text)
            .map(|config| (config, Some(text)))
            .map_err(|e| RepositoryError::Config { path, problem: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((ModelConfig::default(), None)),
        Err(e) => Err(RepositoryError::Config { path, problem: e.to_string() }),
    }
}

/// Every version folder of model `name` in the repository at `root` that holds a model file,
/// whatever the model's version policy says: `(version, model file)`, by version.
pub fn version_files(root: &Path, name: &str) -> Result<Vec<(u64, PathBuf)>, RepositoryError> {
    let mut found: Vec<(u64, PathBuf)> = subdirectories(&root.join(name))?
        .into_iter()
        .filter_map(|(version, dir)| Some((version.parse().ok()?, dir.join(MODEL_FILE))))
        .filter(|(_, file)| file.is_file())
        .collect();
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use sha2::Digest;

    use super::super::model::VersionPolicy;
    use super::*;

    #[test]
    fn version_policy_reads_from_yaml_and_selects() {
        let policy = |yaml: &str| {
            ModelConfig::from_yaml(&format!("version_policy: {yaml}")).expect("policy parses").version_policy
        };
        let available = [3, 1, 2, 10];
        assert_eq!(policy("all").select(&available), vec![1, 2, 3, 10]);
        assert_eq!(policy("{latest: 2}").select(&available), vec![3, 10]);
        assert_eq!(policy("\n  latest: 9").select(&available), vec![1, 2, 3, 10]);
        assert_eq!(policy("{specific: [1, 3, 7]}").select(&available), vec![1, 3]);
        let wrong = ModelConfig::from_yaml("version_policy: {newest: 1}").expect_err("newest is no policy");
        assert!(wrong.to_string().contains("version_policy must be all, {latest: N} or {specific: [versions]}"));
    }

    #[test]
    fn allowed_publishers_are_read_as_written_and_absent_by_default() {
        let config = ModelConfig::from_yaml("allowed_publishers: [core-banking, CN=Risk.Nightly]").expect("parses");
        let expected = ["core-banking".to_string(), "CN=Risk.Nightly".to_string()];
        assert_eq!(config.allowed_publishers.as_deref(), Some(&expected[..]));
        let closed = ModelConfig::from_yaml("allowed_publishers: []").expect("parses");
        assert_eq!(closed.allowed_publishers.as_deref(), Some(&[][..]), "an empty list closes the model");
        assert_eq!(ModelConfig::from_yaml("").expect("parses").allowed_publishers, None);
    }

    #[test]
    fn model_config_keeps_case_and_names_the_key_at_fault() {
        let config = ModelConfig::from_yaml("features: [Age, ABC]\noutputs: [Label]").expect("config parses");
        assert_eq!(config.features.as_deref(), Some(&["Age".to_string(), "ABC".to_string()][..]));
        assert_eq!(config.outputs.as_deref(), Some(&["Label".to_string()][..]));
        let unknown = ModelConfig::from_yaml("Features: [a]").expect_err("keys are case-sensitive").to_string();
        assert!(unknown.contains("unknown field `Features`"), "{unknown}");
        let wrong = ModelConfig::from_yaml("batching: {max_batch_rows: abc}").expect_err("rows are a number");
        assert!(wrong.to_string().contains("batching.max_batch_rows"), "{wrong}");
        for empty in ["", "# every key commented out\n", "batching:\n  # max_batch_rows: 64\n"] {
            let config = ModelConfig::from_yaml(empty).expect("an empty config is the default");
            assert_eq!(config.batching.max_batch_rows, None);
            assert_eq!(config.version_policy, VersionPolicy::default());
        }
    }

    #[test]
    fn an_unreadable_config_names_its_file_and_problem() {
        let scratch = Scratch::new();
        std::fs::write(scratch.root.join(&scratch.model).join(CONFIG_FILE), "featurs: [a]\n").expect("write config");
        let error = read_config(&scratch.root.join(&scratch.model)).expect_err("a misspelt key is refused");
        let message = error.to_string();
        assert!(message.starts_with(&scratch.root.join(&scratch.model).join(CONFIG_FILE).display().to_string()));
        assert!(message.contains("unknown field `featurs`"), "{message}");
    }

    /// A scratch repository holding the `linear` fixture's config and version 1 under a model
    /// name of its own, so no other test in the process shares its metric series.
    struct Scratch {
        root: PathBuf,
        model: String,
        settings: Settings,
    }

    impl Scratch {
        fn new() -> Self {
            // Installed before anything is recorded: metrics recorded before go nowhere.
            telemetry::recorder();
            let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/linear");
            let model = format!("linear_{}", uuid::Uuid::new_v4().simple());
            let root = std::env::temp_dir().join(format!("batchscore-repository-{model}"));
            std::fs::create_dir_all(root.join(&model).join("1")).expect("scratch repository");
            std::fs::copy(fixtures.join(CONFIG_FILE), root.join(&model).join(CONFIG_FILE)).expect("config");
            std::fs::copy(fixtures.join("1").join(MODEL_FILE), root.join(&model).join("1").join(MODEL_FILE))
                .expect("model file");
            let mut settings = Settings::load(Path::new("/nonexistent.yaml"), false).expect("defaults load");
            settings.models.repository = root.clone();
            Self { root, model, settings }
        }

        fn load(&self) -> Repository {
            let env = crate::engine::runtime::environment(None).expect("ONNX Runtime in .onnxruntime/");
            Repository::load(env, &self.settings).expect("the fixture loads")
        }

        fn reload(&self, current: &Repository) -> Option<Repository> {
            let env = crate::engine::runtime::environment(None).expect("ONNX Runtime in .onnxruntime/");
            current.reload(env, &self.settings, &mut Refused::new()).expect("the repository reads")
        }

        /// `batchscore_model_info` summed over this model's version `version`.
        fn model_info(&self, version: u64) -> f64 {
            let labels = [format!("model=\"{}\"", self.model), format!("version=\"{version}\"")];
            telemetry::recorder()
                .render()
                .lines()
                .filter(|line| line.starts_with(&format!("{}{{", telemetry::MODEL_INFO)))
                .filter(|line| labels.iter().all(|label| line.contains(label.as_str())))
                .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn a_scan_with_nothing_to_serve_keeps_the_snapshot_and_its_metrics() {
        let scratch = Scratch::new();
        let current = scratch.load();
        assert_eq!(scratch.model_info(1), 1.0, "the loaded version is marked serving");

        let version_dir = scratch.root.join(&scratch.model).join("1");
        std::fs::rename(&version_dir, scratch.root.join(&scratch.model).join("moved-away")).expect("move v1");
        assert!(scratch.reload(&current).is_none(), "an empty repository keeps the current snapshot");
        assert!(current.resolve(&scratch.model, Some(1)).is_ok(), "version 1 still serves");
        assert_eq!(scratch.model_info(1), 1.0, "the version that keeps serving is not marked retired");
    }

    #[test]
    fn an_edited_config_reloads_the_version_even_with_the_same_file() {
        let scratch = Scratch::new();
        let current = scratch.load();
        let served = Arc::clone(current.resolve(&scratch.model, Some(1)).expect("version 1"));
        assert_eq!(served.published.len(), 2, "the fixture publishes label and probabilities");

        let config = scratch.root.join(&scratch.model).join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config).expect("config");
        let edited = text.replace("outputs: [label, probabilities]", "outputs: [probabilities]");
        assert_ne!(edited, text, "the fixture config lists its outputs on one line");
        std::fs::write(&config, edited).expect("edit config");

        let next = scratch.reload(&current).expect("an edited config.yaml is a change");
        let reloaded = next.resolve(&scratch.model, Some(1)).expect("version 1");
        assert!(!Arc::ptr_eq(reloaded, &served), "the version was loaded again with the edited config");
        let published: Vec<&str> = reloaded.published.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(published, ["probabilities"], "the edited outputs apply");
        assert_eq!(scratch.model_info(1), 1.0, "the reloaded version is marked serving");
    }

    #[test]
    fn an_edited_explain_baseline_reloads_the_version() {
        let scratch = Scratch::new();
        let folder = scratch.root.join(&scratch.model);
        let config = folder.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config).expect("config");
        let explain = "explain: {output: probabilities, class: 1, baseline_file: baseline.json}\n";
        std::fs::write(&config, format!("{text}{explain}")).expect("explain section");
        let baseline = |value: f32| serde_json::to_vec(&vec![value; 62]).expect("baseline");
        std::fs::write(folder.join("baseline.json"), baseline(0.0)).expect("baseline file");
        let current = scratch.load();
        let base_value = |repository: &Repository| {
            let model = repository.resolve(&scratch.model, Some(1)).expect("version 1");
            let explainer = model.explainer.as_ref().expect("an explainer");
            let request = crate::explain::Request { top_k: 1, inputs: vec![0.0; 62], rows: 1, walks: None };
            explainer.explain(&request, None)[0].base_value
        };
        let before = base_value(&current);

        // Longer than before, so the stamp moves even within the file system's time resolution.
        std::fs::write(folder.join("baseline.json"), baseline(100.0)).expect("edit baseline");
        let next = scratch.reload(&current).expect("an edited baseline file is a change");
        assert_ne!(base_value(&next), before, "the version was loaded again with the edited baseline");
    }

    #[test]
    fn a_version_that_cannot_be_archived_serves_is_counted_and_is_archived_once_it_can() {
        let mut scratch = Scratch::new();
        let folder = scratch.root.with_extension("archive");
        scratch.settings.models.archive = Some(folder.clone());
        let model_file = scratch.root.join(&scratch.model).join("1").join(MODEL_FILE);
        let sha256 = format!("{:x}", sha2::Sha256::digest(std::fs::read(&model_file).expect("model file")));
        // A file where the version's folder goes: the archive cannot store it.
        std::fs::create_dir_all(&folder).expect("archive");
        std::fs::write(folder.join(&sha256), b"in the way").expect("blocking file");
        let failures = |scratch: &Scratch| {
            let series = format!("{}{{model=\"{}\"}} ", telemetry::MODEL_ARCHIVE_FAILURES, scratch.model);
            let scrape = telemetry::recorder().render();
            scrape.lines().find_map(|line| line.strip_prefix(series.as_str())?.parse::<f64>().ok())
        };

        let current = scratch.load();
        assert!(current.resolve(&scratch.model, Some(1)).is_ok(), "the version serves all the same");
        assert_eq!(failures(&scratch), Some(1.0), "the failure is counted");

        std::fs::remove_file(folder.join(&sha256)).expect("out of the way");
        assert!(scratch.reload(&current).is_none(), "nothing changed in the repository");
        let archived = std::fs::read(folder.join(&sha256).join(MODEL_FILE)).expect("archived at the next reload");
        assert_eq!(format!("{:x}", sha2::Sha256::digest(&archived)), sha256);
        let config = std::fs::read(scratch.root.join(&scratch.model).join(CONFIG_FILE)).expect("config");
        assert!(folder.join(&sha256).join(archive::config_name(&config)).is_file(), "its config beside it");
        assert_eq!(failures(&scratch), Some(1.0), "a success is not counted as a failure");
        let _ = std::fs::remove_dir_all(&folder);
    }
}

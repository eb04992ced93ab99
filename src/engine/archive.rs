//! The model archive (`models.archive`): a content-addressed folder where the worker keeps every
//! model file it ever served, so that a score can be reproduced from its audit record long after
//! the version left the repository. A version's files sit in `<archive>/<model_sha256>/`:
//! `model.onnx`, each config.yaml it was served with as `config-<first 16 hex of the config's
//! sha256>.yaml`, and the explanation baseline file a config names, under the name it uses.
//!
//! Files are written once: to a temporary file in the same folder, synced, then renamed into
//! place, so a crash never leaves half a file under a final name, and a file already there is
//! never written again. What to do about a failure (log, count, keep serving) is the caller's.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// The model file's name in a version's archive folder, as in the repository.
pub const MODEL_FILE: &str = "model.onnx";

/// Why a file could not be archived, or the archive cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "setting models.archive: the folder {} cannot be used: {source}; create it and make it writable \
         by the worker, or unset models.archive",
        path.display()
    )]
    Unusable { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot write {} to the model archive: {source}; free space on its disk or make models.archive writable \
         by the worker",
        path.display()
    )]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot read {} to archive it: {source}; the repository must stay readable by the worker",
        path.display()
    )]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{} changed while it was archived (sha256 {actual}, loaded as {expected}); replace model files \
         atomically (write beside them, then rename), the next reload archives the new file",
        path.display()
    )]
    Changed { path: PathBuf, expected: String, actual: String },
    #[error(
        "the explanation baseline file {} is not inside the model's folder, so the archive cannot keep it \
         beside the config; name a file inside the model's folder in config.yaml explain.baseline_file",
        name.display()
    )]
    OutsideFolder { name: PathBuf },
}

/// A version to archive: its model file and digest, the config text it was loaded with (none
/// without a config.yaml), and the explanation baseline file the config names, by that name.
pub struct Version<'a> {
    pub sha256: &'a str,
    pub model_file: &'a Path,
    pub config: Option<&'a [u8]>,
    pub baseline: Option<Baseline<'a>>,
}

/// An explanation baseline file: the name config.yaml gives it, and where it is now.
pub struct Baseline<'a> {
    pub name: &'a Path,
    pub file: &'a Path,
}

/// Checks that `folder` exists or can be created, and that the worker can write in it.
pub fn check(folder: &Path) -> Result<(), ArchiveError> {
    let unusable = |source| ArchiveError::Unusable { path: folder.to_path_buf(), source };
    std::fs::create_dir_all(folder).map_err(unusable)?;
    let probe = folder.join(format!(".write-check-{}", uuid::Uuid::new_v4().simple()));
    std::fs::File::create(&probe).map_err(unusable)?;
    std::fs::remove_file(&probe).map_err(unusable)
}

/// The folder of the version whose model file has digest `sha256`.
pub fn folder(archive: &Path, sha256: &str) -> PathBuf {
    archive.join(sha256)
}

/// The name a config is archived under: `config-<first 16 hex of its sha256>.yaml`.
pub fn config_name(config: &[u8]) -> String {
    let digest = format!("{:x}", Sha256::digest(config));
    format!("config-{}.yaml", &digest[..16])
}

/// Whether `name` is a config file's name in a version's archive folder.
pub fn is_config_name(name: &str) -> bool {
    name.starts_with("config-") && name.ends_with(".yaml")
}

/// Stores `version` in `archive`, skipping files already there. Returns the version's folder.
pub fn store(archive: &Path, version: &Version<'_>) -> Result<PathBuf, ArchiveError> {
    let folder = folder(archive, version.sha256);
    std::fs::create_dir_all(&folder).map_err(|source| ArchiveError::Write { path: folder.clone(), source })?;
    store_model(&folder.join(MODEL_FILE), version)?;
    if let Some(config) = version.config {
        let target = folder.join(config_name(config));
        if !target.exists() {
            write_once(&target, |file, partial| {
                file.write_all(config).map_err(|source| ArchiveError::Write { path: partial.to_path_buf(), source })
            })?;
        }
    }
    if let Some(baseline) = &version.baseline {
        store_baseline(&folder, baseline)?;
    }
    Ok(folder)
}

/// Copies the model file, checking on the way that it is still the file that was loaded.
fn store_model(target: &Path, version: &Version<'_>) -> Result<(), ArchiveError> {
    if target.exists() {
        return Ok(());
    }
    write_once(target, |file, partial| {
        let actual = copy(version.model_file, file, partial)?;
        if actual != version.sha256 {
            return Err(ArchiveError::Changed {
                path: version.model_file.to_path_buf(),
                expected: version.sha256.to_string(),
                actual,
            });
        }
        Ok(())
    })
}

/// Copies the baseline file beside the config, under the name the config uses, so that the
/// archived config resolves it in the archive folder as it did in the repository.
fn store_baseline(folder: &Path, baseline: &Baseline<'_>) -> Result<(), ArchiveError> {
    let inside = baseline.name.components().all(|c| matches!(c, Component::Normal(_)));
    if !inside || baseline.name.as_os_str().is_empty() {
        return Err(ArchiveError::OutsideFolder { name: baseline.name.to_path_buf() });
    }
    let target = folder.join(baseline.name);
    if target.exists() {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ArchiveError::Write { path: parent.to_path_buf(), source })?;
    }
    write_once(&target, |file, partial| copy(baseline.file, file, partial).map(drop))
}

/// Writes `target` through a temporary file in the same folder, which `fill` fills: synced, then
/// renamed. When `fill` fails, nothing is left under either name.
fn write_once(
    target: &Path,
    fill: impl FnOnce(&mut std::fs::File, &Path) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = target.with_file_name(format!(".{name}.{}.partial", uuid::Uuid::new_v4().simple()));
    let write = |source| ArchiveError::Write { path: partial.clone(), source };
    let written = std::fs::File::create(&partial).map_err(write).and_then(|mut file| {
        fill(&mut file, &partial)?;
        file.flush().map_err(write)?;
        // Synced before the rename: after a crash the final name holds the whole file or nothing.
        file.sync_all().map_err(write)?;
        std::fs::rename(&partial, target).map_err(|source| ArchiveError::Write { path: target.to_path_buf(), source })
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// Copies `source` into `file` (the temporary file `partial`); returns the hex sha256 of what it
/// copied.
fn copy(source: &Path, file: &mut std::fs::File, partial: &Path) -> Result<String, ArchiveError> {
    let read = |error| ArchiveError::Read { path: source.to_path_buf(), source: error };
    let mut input = std::fs::File::open(source).map_err(read)?;
    let mut digest = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(read(error)),
        };
        digest.update(&buffer[..n]);
        file.write_all(&buffer[..n]).map_err(|source| ArchiveError::Write { path: partial.to_path_buf(), source })?;
    }
    Ok(format!("{:x}", digest.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of its own in the temporary directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let path = std::env::temp_dir().join(format!("batchscore-archive-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).expect("scratch folder");
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sha256(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    /// Every file under `folder`, relative, sorted.
    fn files(folder: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(folder).expect("readable") {
            let path = entry.expect("entry").path();
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            if path.is_dir() {
                found.extend(files(&path).into_iter().map(|inner| format!("{name}/{inner}")));
            } else {
                found.push(name);
            }
        }
        found.sort();
        found
    }

    #[test]
    fn configs_are_named_by_the_first_16_hex_of_their_sha256() {
        let config = b"features: [a, b]\n";
        let name = config_name(config);
        assert_eq!(name, format!("config-{}.yaml", &sha256(config)[..16]));
        assert!(is_config_name(&name) && !is_config_name("model.onnx"));
        assert_ne!(config_name(b"features: [b, a]\n"), name, "another config, another name");
    }

    #[test]
    fn storing_a_version_twice_writes_it_once() {
        let scratch = Scratch::new();
        let model = scratch.0.join("model.onnx");
        std::fs::write(&model, b"model bytes").expect("model");
        let digest = sha256(b"model bytes");
        let archive = scratch.0.join("archive");
        let version = Version { sha256: &digest, model_file: &model, config: Some(b"outputs: [y]\n"), baseline: None };

        let folder = store(&archive, &version).expect("stored");
        assert_eq!(folder, archive.join(&digest));
        assert_eq!(std::fs::read(folder.join("model.onnx")).expect("archived"), b"model bytes");
        let config = folder.join(config_name(b"outputs: [y]\n"));
        assert_eq!(std::fs::read(&config).expect("config archived"), b"outputs: [y]\n");
        let written = std::fs::metadata(folder.join("model.onnx")).and_then(|m| m.modified()).expect("mtime");

        // The repository's file goes; the archive keeps its copy, untouched by a second store.
        std::fs::remove_file(&model).expect("removed");
        store(&archive, &version).expect("stored again without the repository file");
        let again = std::fs::metadata(folder.join("model.onnx")).and_then(|m| m.modified()).expect("mtime");
        assert_eq!(again, written, "an archived file is never written again");
        let mut expected = vec![format!("{digest}/model.onnx"), format!("{digest}/{}", config_name(b"outputs: [y]\n"))];
        expected.sort();
        assert_eq!(files(&archive), expected, "no temporary file left behind");
    }

    #[test]
    fn each_config_a_version_is_served_with_is_kept_beside_it() {
        let scratch = Scratch::new();
        let model = scratch.0.join("model.onnx");
        std::fs::write(&model, b"model").expect("model");
        let digest = sha256(b"model");
        for config in [&b"features: [a, b]\n"[..], b"features: [b, a]\n"] {
            let version = Version { sha256: &digest, model_file: &model, config: Some(config), baseline: None };
            store(&scratch.0, &version).expect("stored");
        }
        let configs: Vec<String> = files(&scratch.0.join(&digest)).into_iter().filter(|f| is_config_name(f)).collect();
        assert_eq!(configs.len(), 2, "{configs:?}");
    }

    #[test]
    fn the_baseline_file_keeps_the_name_the_config_gives_it() {
        let scratch = Scratch::new();
        let model = scratch.0.join("model.onnx");
        let baseline = scratch.0.join("baseline.json");
        std::fs::write(&model, b"model").expect("model");
        std::fs::write(&baseline, b"[0.5, 1.5]").expect("baseline");
        let digest = sha256(b"model");
        let archive = scratch.0.join("archive");
        let name = Path::new("explain/baseline.json");
        let version = Version {
            sha256: &digest,
            model_file: &model,
            config: Some(b"explain: {output: y, baseline_file: explain/baseline.json}\n"),
            baseline: Some(Baseline { name, file: &baseline }),
        };
        let folder = store(&archive, &version).expect("stored");
        assert_eq!(std::fs::read(folder.join(name)).expect("baseline archived"), b"[0.5, 1.5]");

        let outside =
            Version { baseline: Some(Baseline { name: Path::new("../baseline.json"), file: &baseline }), ..version };
        let error = store(&archive, &outside).expect_err("a baseline outside the folder is refused");
        assert!(error.to_string().contains("explain.baseline_file"), "{error}");
    }

    #[test]
    fn a_file_that_changed_since_it_was_loaded_is_not_archived() {
        let scratch = Scratch::new();
        let model = scratch.0.join("model.onnx");
        std::fs::write(&model, b"the new file").expect("model");
        let loaded = sha256(b"the old file");
        let version = Version { sha256: &loaded, model_file: &model, config: None, baseline: None };
        let error = store(&scratch.0.join("archive"), &version).expect_err("digest differs");
        assert!(matches!(error, ArchiveError::Changed { .. }), "{error}");
        assert!(files(&scratch.0.join("archive")).is_empty(), "nothing left under any name");
    }

    #[test]
    fn a_folder_that_cannot_be_created_is_unusable_and_named() {
        let scratch = Scratch::new();
        let file = scratch.0.join("a-file");
        std::fs::write(&file, b"").expect("file");
        let error = check(&file.join("archive")).expect_err("a folder under a file");
        assert!(error.to_string().contains("models.archive"), "{error}");
        check(&scratch.0.join("new/archive")).expect("created");
        assert!(scratch.0.join("new/archive").is_dir());
    }
}

//! Finds the ONNX Runtime shared library, loads it, and owns the process's single environment.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

/// The folder `scripts/setup.sh` extracts the library into, relative to the project root.
pub const PROJECT_LIBRARY_DIR: &str = ".onnxruntime";

/// ONNX Runtime minor version the bindings are built against (`api-31`).
pub const REQUIRED_MINOR_VERSION: u32 = ort::MINOR_VERSION;

const FIX: &str = "run scripts/setup.sh to download it into .onnxruntime/, \
                   or point onnxruntime.library_path (or ORT_DYLIB_PATH) at libonnxruntime.so from onnxruntime==1.31.1";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found (looked at: {looked}); {FIX}")]
    NotFound { looked: String },
    #[error("ONNX Runtime library at {path} is too old: {detail}; batchscore needs 1.{REQUIRED_MINOR_VERSION} or newer; {FIX}")]
    TooOld { path: PathBuf, detail: String },
    #[error("cannot load ONNX Runtime library {path}: {detail}; {FIX}")]
    Load { path: PathBuf, detail: String },
    #[error("cannot create the ONNX Runtime environment: {0}")]
    Environment(String),
}

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

/// Loads the library (first call only) and returns the process-wide environment.
///
/// ONNX Runtime allows one environment per process, so every engine in the process shares it;
/// the library path of the first successful call wins.
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = locate_library(configured)?;
    let builder = ort::init_from(&path).map_err(|e| classify_load_error(&path, e))?;
    let env = builder.with_name("batchscore").build().map_err(|e| RuntimeError::Environment(e.to_string()))?;
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// Lookup order: the setting, `ORT_DYLIB_PATH`, then `.onnxruntime/` beside the working directory
/// or any ancestor of the executable (so `target/release/batchscore` finds the project's copy).
pub fn locate_library(configured: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let mut looked = Vec::new();
    let explicit = configured
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(PathBuf::from));
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path);
        }
        return Err(RuntimeError::NotFound { looked: path.display().to_string() });
    }
    let mut dirs = vec![];
    if let Ok(cwd) = std::env::current_dir() {
        dirs.push(cwd.join(PROJECT_LIBRARY_DIR));
    }
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).map(|dir| dir.join(PROJECT_LIBRARY_DIR)));
    }
    for dir in dirs {
        if let Some(found) = library_in(&dir) {
            return Ok(found);
        }
        looked.push(dir.display().to_string());
    }
    looked.dedup();
    Err(RuntimeError::NotFound { looked: looked.join(", ") })
}

/// The newest `libonnxruntime.so*` in `dir`, if any.
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib")
        })
        .collect();
    candidates.sort();
    candidates.pop()
}

fn classify_load_error(path: &Path, error: ort::LoadDynamicError) -> RuntimeError {
    let detail = error.to_string();
    match error {
        ort::LoadDynamicError::BadVersion { .. } => RuntimeError::TooOld { path: path.to_path_buf(), detail },
        _ => RuntimeError::Load { path: path.to_path_buf(), detail },
    }
}

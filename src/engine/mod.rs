//! ONNX Runtime: the library and environment, the model repository and its archive, sessions
//! and batch runs.

pub mod archive;
pub mod model;
pub mod outputs;
pub mod repository;
pub mod runtime;

pub use model::{InferenceError, ModelVersion, PooledSession};
pub use outputs::Column;
pub use repository::{LookupError, Repository};

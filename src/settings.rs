//! Worker settings: `settings.yaml` (or `--config PATH`) overlaid with `BATCHSCORE__<SECTION>__<KEY>`
//! environment variables, checked once at start-up so that a bad value is reported by its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of environment overrides: `BATCHSCORE__BATCHING__MAX_BATCH_ROWS=512`.
pub const ENV_PREFIX: &str = "BATCHSCORE";

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings from {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error("setting {key}: {problem}")]
    Invalid { key: &'static str, problem: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub amqp: AmqpSettings,
    #[serde(default)]
    pub models: ModelSettings,
    #[serde(default)]
    pub batching: BatchingSettings,
    #[serde(default = "BatchingSettings::bulk")]
    pub bulk_batching: BatchingSettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub inference: InferenceSettings,
    #[serde(default)]
    pub onnxruntime: OnnxRuntimeSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub logging: LoggingSettings,
    #[serde(default)]
    pub shutdown: ShutdownSettings,
}

/// Broker connection and queues.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// AMQP URI, `amqp://` or `amqps://` (credentials and vhost included).
    pub url: String,
    /// Queue of the online lane: jobs whose rows are batched first.
    pub jobs_queue: String,
    /// Queue of the bulk lane (empty: no bulk lane); its rows run when the online lane has none.
    pub bulk_queue: String,
    /// Queue that receives results of jobs without a `reply_to`.
    pub results_queue: String,
    /// Unacknowledged online jobs the broker may hand this worker at once.
    pub prefetch: u16,
    /// Unacknowledged bulk jobs the broker may hand this worker at once.
    pub bulk_prefetch: u16,
    /// While an online job arrived within this many ms, the bulk lane holds one job at a time;
    /// 0: the bulk lane never holds back.
    pub bulk_yield_ms: u64,
    /// Declare the topology at start-up; `false` only checks that it exists.
    pub declare_queues: bool,
    /// Deliveries of one job before the broker dead-letters it instead (quorum `x-delivery-limit`).
    pub delivery_limit: u32,
    /// Exchange that receives dead-lettered jobs (fanout, durable).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange, where poison jobs wait for a person.
    pub dead_letter_queue: String,
    /// How long a published result may wait for the broker's confirm before the connection is
    /// considered broken (its unacknowledged jobs are then redelivered).
    pub confirm_timeout_ms: u64,
    /// Name shown for this connection in the RabbitMQ management UI.
    pub connection_name: String,
    /// Longest pause between reconnection attempts after the broker went away.
    pub reconnect_max_backoff_ms: u64,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            jobs_queue: "scoring.jobs".into(),
            bulk_queue: String::new(),
            results_queue: "scoring.results".into(),
            prefetch: 256,
            bulk_prefetch: 8,
            bulk_yield_ms: 250,
            declare_queues: true,
            delivery_limit: 5,
            dead_letter_exchange: "scoring.dlx".into(),
            dead_letter_queue: "scoring.dlq".into(),
            confirm_timeout_ms: 30_000,
            connection_name: "batchscore".into(),
            reconnect_max_backoff_ms: 30_000,
        }
    }
}

/// Where models come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Model repository: `<repository>/<model>/<version>/model.onnx`.
    pub repository: PathBuf,
    /// How often the repository is checked for new, replaced and removed versions; 0 turns polling
    /// off (SIGHUP still reloads).
    pub poll_interval_ms: u64,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self { repository: PathBuf::from("models"), poll_interval_ms: 10_000 }
    }
}

/// How rows of many jobs are gathered into one ONNX Runtime run (per model version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSettings {
    /// Most rows in one run; larger jobs are split across runs.
    pub max_batch_rows: usize,
    /// Longest a forming batch waits for a busy engine before it stops taking rows.
    pub max_delay_ms: u64,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self { max_batch_rows: 1024, max_delay_ms: 5 }
    }
}

impl BatchingSettings {
    /// The bulk lane's defaults: larger runs, and more patience to fill them.
    pub fn bulk() -> Self {
        Self { max_batch_rows: 4096, max_delay_ms: 50 }
    }
}

/// Per-job limits; a job beyond them is answered with `too_large`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub max_rows_per_job: usize,
    pub max_job_bytes: usize,
    /// Rows decoded and not yet answered, per lane; beyond it the lane takes no new delivery.
    pub max_inflight_rows: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self { max_rows_per_job: 100_000, max_job_bytes: 16 * 1024 * 1024, max_inflight_rows: 100_000 }
    }
}

/// ONNX Runtime sessions.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceSettings {
    /// Sessions per model version, i.e. batches of one model that may run at once.
    pub sessions: usize,
    /// Threads inside one run; 0 lets ONNX Runtime use one per core.
    pub intra_threads: usize,
    /// Let ONNX Runtime's threads spin-wait between runs (its default): lower latency for small
    /// batches, CPU taken from whatever else shares the cores.
    pub intra_op_spinning: bool,
    /// Where models run unless their config.yaml says otherwise.
    pub execution_provider: ExecutionProvider,
    /// GPU used by the CUDA execution provider.
    pub cuda_device_id: i32,
    /// Cap on the CUDA memory arena of one session, in MiB; 0: no cap.
    pub cuda_memory_limit_mb: u64,
    /// What happens when a model's execution provider cannot be registered.
    pub on_provider_unavailable: ProviderUnavailable,
    /// `noop` answers every row with zeros of the model's output shapes without running it: the
    /// worker's and broker's own cost, for benchmarks. Never for real traffic.
    pub engine: Engine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    OnnxRuntime,
    Noop,
}

impl Default for InferenceSettings {
    fn default() -> Self {
        Self {
            sessions: 1,
            intra_threads: 0,
            intra_op_spinning: true,
            execution_provider: ExecutionProvider::Cpu,
            cuda_device_id: 0,
            cuda_memory_limit_mb: 0,
            on_provider_unavailable: ProviderUnavailable::Fail,
            engine: Engine::OnnxRuntime,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
}

impl ExecutionProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderUnavailable {
    /// The model does not load: the worker refuses to start (or a reload keeps the old version).
    Fail,
    /// The model runs on the CPU; a warning is logged and `batchscore_model_info` says `provider="cpu"`.
    Cpu,
}

/// Where the ONNX Runtime shared library is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxRuntimeSettings {
    /// Path to `libonnxruntime.so*`; empty: `ORT_DYLIB_PATH`, then `.onnxruntime/` in the project.
    pub library_path: Option<PathBuf>,
}

/// Prometheus metrics and health endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// `host:port` for `/metrics`, `/healthz`, `/readyz`; port 0 picks a free port (logged).
    pub listen: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { listen: "0.0.0.0:9464".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSettings {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// Filter in `RUST_LOG` syntax; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LoggingSettings {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// After SIGTERM/SIGINT, how long in-flight jobs may take to finish before the worker exits.
    pub timeout_ms: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self { timeout_ms: 30_000 }
    }
}

impl Settings {
    /// Reads `path` (which must exist when `required`), then environment overrides, then validates.
    pub fn load(path: &Path, required: bool) -> Result<Self, SettingsError> {
        let load_error = |source| SettingsError::Load { path: path.to_path_buf(), source };
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Yaml).required(required))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX).prefix_separator("__").separator("__").try_parsing(true),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(load_error)?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, problem: &str| Err(SettingsError::Invalid { key, problem: problem.to_string() });
        if !(self.amqp.url.starts_with("amqp://") || self.amqp.url.starts_with("amqps://")) {
            return invalid("amqp.url", "must start with amqp:// or amqps://");
        }
        if self.amqp.jobs_queue.is_empty() {
            return invalid("amqp.jobs_queue", "must not be empty");
        }
        if self.amqp.results_queue.is_empty() {
            return invalid("amqp.results_queue", "must not be empty");
        }
        if self.amqp.dead_letter_exchange.is_empty() {
            return invalid("amqp.dead_letter_exchange", "must not be empty");
        }
        if self.amqp.dead_letter_queue.is_empty() {
            return invalid("amqp.dead_letter_queue", "must not be empty");
        }
        if self.amqp.delivery_limit == 0 {
            return invalid("amqp.delivery_limit", "must be at least 1");
        }
        if self.amqp.confirm_timeout_ms == 0 {
            return invalid("amqp.confirm_timeout_ms", "must be at least 1");
        }
        if self.amqp.prefetch == 0 {
            return invalid("amqp.prefetch", "must be at least 1 (0 would mean unlimited)");
        }
        if self.amqp.bulk_prefetch == 0 {
            return invalid("amqp.bulk_prefetch", "must be at least 1 (0 would mean unlimited)");
        }
        if self.amqp.bulk_queue == self.amqp.jobs_queue {
            return invalid("amqp.bulk_queue", "must differ from amqp.jobs_queue (or be empty: no bulk lane)");
        }
        if self.bulk_batching.max_batch_rows == 0 {
            return invalid("bulk_batching.max_batch_rows", "must be at least 1");
        }
        if self.limits.max_inflight_rows == 0 {
            return invalid("limits.max_inflight_rows", "must be at least 1");
        }
        if self.batching.max_batch_rows == 0 {
            return invalid("batching.max_batch_rows", "must be at least 1");
        }
        if self.limits.max_rows_per_job == 0 {
            return invalid("limits.max_rows_per_job", "must be at least 1");
        }
        if self.limits.max_job_bytes == 0 {
            return invalid("limits.max_job_bytes", "must be at least 1");
        }
        if self.inference.sessions == 0 {
            return invalid("inference.sessions", "must be at least 1");
        }
        if self.inference.cuda_device_id < 0 {
            return invalid("inference.cuda_device_id", "must be 0 or more");
        }
        if self.metrics_addr().is_err() {
            return invalid("metrics.listen", "must be host:port, e.g. 0.0.0.0:9464 (port 0 picks a free port)");
        }
        Ok(())
    }

    pub fn metrics_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        self.metrics.listen.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_settings_file_is_valid_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("settings.yaml");
        let settings = Settings::load(&path, true).expect("settings.yaml must load");
        assert_eq!(settings.amqp.jobs_queue, "scoring.jobs");
        assert_eq!(settings.amqp.results_queue, "scoring.results");
        assert_eq!(settings.models.repository, PathBuf::from("models"));
        assert_eq!(settings.batching, BatchingSettings::default());
    }

    #[test]
    fn invalid_value_names_its_key() {
        let mut settings = Settings::load(Path::new("/nonexistent.yaml"), false).expect("defaults load");
        settings.batching.max_batch_rows = 0;
        let message = settings.validate().expect_err("zero rows is invalid").to_string();
        assert!(message.contains("batching.max_batch_rows"), "{message}");
    }
}

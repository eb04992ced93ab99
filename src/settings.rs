//! Worker settings: `settings.yaml` (or `--config PATH`) overlaid with `BATCHSCORE__<SECTION>__<KEY>`
//! environment variables, checked once at start-up so that a bad value is reported by its key.

use std::collections::BTreeMap;
use std::fmt;
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
    /// A secret named by a `*_file` setting cannot be read. The message names the file, never
    /// its content.
    #[error("setting {key}: cannot read {}: {source}; mount the secret there or unset {key}", path.display())]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    #[serde(default)]
    pub security: SecuritySettings,
    #[serde(default)]
    pub audit: AuditSettings,
}

/// The broker of `amqp.url` when no setting names one: the local RabbitMQ, as guest.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Broker connection and queues.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// AMQP URI, `amqp://` or `amqps://` (credentials and vhost included). After loading it is
    /// the URI the worker connects to, with the secrets of `url_file` and `password_file` in it:
    /// print it only through [`redact`].
    pub url: String,
    /// File holding the whole AMQP URI (a mounted Secret), instead of `url`.
    pub url_file: Option<PathBuf>,
    /// File holding the broker password, which replaces the password of the URI.
    pub password_file: Option<PathBuf>,
    /// Allow plaintext `amqp://` to a broker that is not on this machine (loopback).
    pub allow_plaintext: bool,
    /// TLS of `amqps://` connections.
    pub tls: TlsSettings,
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
            url: DEFAULT_AMQP_URL.into(),
            url_file: None,
            password_file: None,
            allow_plaintext: false,
            tls: TlsSettings::default(),
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

/// Written by hand so that the URI's password never reaches a log line or a panic message: the
/// URI is shown through [`redact`].
impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &redact(&self.url))
            .field("url_file", &self.url_file)
            .field("password_file", &self.password_file)
            .field("allow_plaintext", &self.allow_plaintext)
            .field("tls", &self.tls)
            .field("jobs_queue", &self.jobs_queue)
            .field("bulk_queue", &self.bulk_queue)
            .field("results_queue", &self.results_queue)
            .field("prefetch", &self.prefetch)
            .field("bulk_prefetch", &self.bulk_prefetch)
            .field("bulk_yield_ms", &self.bulk_yield_ms)
            .field("declare_queues", &self.declare_queues)
            .field("delivery_limit", &self.delivery_limit)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("confirm_timeout_ms", &self.confirm_timeout_ms)
            .field("connection_name", &self.connection_name)
            .field("reconnect_max_backoff_ms", &self.reconnect_max_backoff_ms)
            .finish()
    }
}

impl AmqpSettings {
    /// Puts the secrets of `url_file` and `password_file` into `url`. `url_given`: a source (the
    /// settings file or the environment) set `url`, which `url_file` would contradict.
    fn resolve_secrets(&mut self, url_given: bool) -> Result<(), SettingsError> {
        if let Some(path) = &self.url_file {
            if url_given {
                return Err(SettingsError::Invalid {
                    key: "amqp.url_file",
                    problem: format!(
                        "({}) is set, and so is amqp.url (in the settings file or BATCHSCORE__AMQP__URL); keep \
                         one of them",
                        path.display()
                    ),
                });
            }
            self.url = read_secret("amqp.url_file", path)?;
        }
        if let Some(path) = &self.password_file {
            let password = read_secret("amqp.password_file", path)?;
            self.url = with_password(&self.url, &password).ok_or_else(|| SettingsError::Invalid {
                key: "amqp.password_file",
                problem: format!(
                    "needs a user name in the broker URI to go with the password, e.g. \
                         amqps://batchscore@broker.example:5671/%2f (the URI is {})",
                    redact(&self.url)
                ),
            })?;
        }
        Ok(())
    }

    /// The key the URI came from, for error messages.
    fn url_key(&self) -> &'static str {
        if self.url_file.is_some() {
            "amqp.url_file"
        } else {
            "amqp.url"
        }
    }
}

/// TLS of `amqps://` connections. The broker's certificate is always verified, its host name
/// included: there is no setting to turn that off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// CA certificates (PEM) the broker's certificate must chain to; when set, no other CA is
    /// trusted. Empty: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM, the certificate first, then any intermediates), for brokers that
    /// verify clients and for certificate login (`?auth_mechanism=external` in the URI).
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl TlsSettings {
    fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// A secret's file content without its trailing line break (`echo secret > file` adds one; a
/// Kubernetes Secret mounted as a file has none).
fn read_secret(key: &'static str, path: &Path) -> Result<String, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::SecretFile {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(SettingsError::Invalid { key, problem: format!("{} is empty", path.display()) });
    }
    Ok(secret.to_string())
}

/// `url` with `password` (percent-encoded) as the password of its user; `None` when the URI
/// names no user.
fn with_password(url: &str, password: &str) -> Option<String> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    let user = authority[..at].split(':').next().unwrap_or_default();
    if user.is_empty() {
        return None;
    }
    Some(format!("{}{user}:{}{}", &url[..authority_start], percent_encode(password), &rest[at..]))
}

/// Every byte but the URI's unreserved characters as `%XX`, so a password may hold `@`, `:`,
/// `/` or `%`.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// `amqp://user:secret@host` → `amqp://user:***@host`. Everything up to the last `@` counts as
/// credentials, so a password holding an unencoded `/`, `?` or `@` is hidden too.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &credentials[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
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
    /// The model archive (`engine::archive`): a folder where every model file the worker serves is
    /// kept by its sha256, so that audited scores stay reproducible after the version leaves the
    /// repository. Empty: none.
    pub archive: Option<PathBuf>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self { repository: PathBuf::from("models"), poll_interval_ms: 10_000, archive: None }
    }
}

impl ModelSettings {
    /// The archive folder, when one is set (an empty value sets none).
    pub fn archive(&self) -> Option<&Path> {
        self.archive.as_deref().filter(|path| !path.as_os_str().is_empty())
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
    /// Let ONNX Runtime's threads spin-wait for work instead of sleeping at once (ONNX Runtime's
    /// own default). Off by default: the spinning takes CPU from decoding, encoding and the
    /// broker, and measured slower on shared cores (docs/PERFORMANCE.md, "Spin policy").
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
            intra_op_spinning: false,
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

/// The audit trail (docs/AUDIT.md): one record per answered job, appended to a RabbitMQ stream
/// and confirmed before the job is acknowledged.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Record every answered job; off, nothing of the trail runs.
    pub enabled: bool,
    /// The stream the records go to (declared with `amqp.declare_queues`).
    pub stream: String,
    /// How long the stream keeps records (its `x-max-age`): a whole number and a unit, `Y`, `M`,
    /// `D`, `h`, `m` or `s`, e.g. `2555D` (7 years).
    pub max_age: String,
    /// The most bytes the stream keeps (its `x-max-length-bytes`); older segments go first.
    pub max_bytes: u64,
    /// Records hold the result's outputs; `false`: only their sha256.
    pub include_outputs: bool,
    /// Records hold the job's rows as scored (applicants' data); `false`: only their sha256.
    pub include_inputs: bool,
    /// Names this worker's chains of records; empty in the settings file: the host name.
    pub worker_id: String,
    /// How far back in the stream the worker looks at start-up for its own last record, which
    /// its first chain then names (`previous_chain`); 0: it does not look.
    pub previous_chain_lookback_ms: u64,
    /// The PostgreSQL database `batchscore audit sink` copies the stream into,
    /// `postgres://USER@HOST:PORT/DATABASE`; empty: none (`--database` gives one).
    pub database: String,
    /// File holding the database password, which replaces the password of `database`.
    pub database_password_file: Option<PathBuf>,
}

/// Written by hand so that a password in `database` never reaches a log line.
impl fmt::Debug for AuditSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSettings")
            .field("enabled", &self.enabled)
            .field("stream", &self.stream)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.max_bytes)
            .field("include_outputs", &self.include_outputs)
            .field("include_inputs", &self.include_inputs)
            .field("worker_id", &self.worker_id)
            .field("previous_chain_lookback_ms", &self.previous_chain_lookback_ms)
            .field("database", &redact(&self.database))
            .field("database_password_file", &self.database_password_file)
            .finish()
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            stream: "scoring.audit".into(),
            max_age: "2555D".into(),
            max_bytes: 20_000_000_000,
            include_outputs: true,
            include_inputs: false,
            worker_id: String::new(),
            previous_chain_lookback_ms: 600_000,
            database: String::new(),
            database_password_file: None,
        }
    }
}

impl AuditSettings {
    /// Fills an empty `worker_id` with the host name, when the system gives one.
    fn resolve_worker_id(&mut self) {
        if self.worker_id.is_empty() {
            self.worker_id = host_name().unwrap_or_default();
        }
    }

    /// The audit database's URL: `given` (`--database`), else `audit.database`, with the password
    /// of `audit.database_password_file` in it when that is set. Without a password, the
    /// connection uses PGPASSWORD.
    pub fn database_url(&self, given: Option<&str>) -> Result<String, SettingsError> {
        let (key, url) = match given {
            Some(url) => ("--database", url),
            None => ("audit.database", self.database.as_str()),
        };
        if url.is_empty() {
            return Err(SettingsError::Invalid {
                key,
                problem: "is empty; give the audit database as postgres://USER@HOST:PORT/DATABASE (audit.database, \
                          BATCHSCORE__AUDIT__DATABASE or --database)"
                    .into(),
            });
        }
        if !is_postgres_url(url) {
            return Err(SettingsError::Invalid {
                key,
                problem: format!("{} must start with postgres:// or postgresql://", redact(url)),
            });
        }
        let Some(path) = &self.database_password_file else {
            return Ok(url.to_string());
        };
        let password = read_secret("audit.database_password_file", path)?;
        with_password(url, &password).ok_or_else(|| SettingsError::Invalid {
            key: "audit.database_password_file",
            problem: format!(
                "needs a user name in the database URL to go with the password, e.g. \
                 postgres://batchscore_audit_sink@db.example:5432/audit (the URL is {})",
                redact(url)
            ),
        })
    }

    fn validate(&self, amqp: &AmqpSettings) -> Result<(), SettingsError> {
        let invalid = |key, problem: String| Err(SettingsError::Invalid { key, problem });
        if !self.database.is_empty() && !is_postgres_url(&self.database) {
            return invalid(
                "audit.database",
                format!(
                    "{} must start with postgres:// or postgresql://, e.g. postgres://batchscore_audit_sink@db:5432/audit",
                    redact(&self.database)
                ),
            );
        }
        if self.stream.is_empty() || self.stream.len() > 255 {
            return invalid("audit.stream", "must be a queue name of 1 to 255 bytes, e.g. scoring.audit".into());
        }
        let queues = [&amqp.jobs_queue, &amqp.bulk_queue, &amqp.results_queue, &amqp.dead_letter_queue];
        if queues.contains(&&self.stream) {
            return invalid(
                "audit.stream",
                format!("{:?} is also one of the amqp queues; give the stream a name of its own", self.stream),
            );
        }
        if !is_max_age(&self.max_age) {
            return invalid(
                "audit.max_age",
                format!(
                    "{:?} is not a RabbitMQ x-max-age: write a whole number above 0 and one unit, Y (years), M \
                     (months), D (days), h, m or s, e.g. 2555D for 7 years",
                    self.max_age
                ),
            );
        }
        if self.max_bytes == 0 {
            return invalid("audit.max_bytes", "must be at least 1 byte, e.g. 20000000000 (20 GB)".into());
        }
        if self.enabled && self.worker_id.is_empty() {
            return invalid(
                "audit.worker_id",
                "is empty and the host name could not be read; set it to a name unique to this worker (e.g. \
                 BATCHSCORE__AUDIT__WORKER_ID=$HOSTNAME)"
                    .into(),
            );
        }
        if self.worker_id.len() > 255 || self.worker_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return invalid(
                "audit.worker_id",
                format!("{:?} must be at most 255 bytes, without spaces or control characters", self.worker_id),
            );
        }
        Ok(())
    }
}

fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `age` is RabbitMQ's `x-max-age`: digits (not all zero) and one unit letter.
fn is_max_age(age: &str) -> bool {
    let Some((number, unit)) = age.char_indices().last().map(|(at, unit)| (&age[..at], unit)) else {
        return false;
    };
    matches!(unit, 'Y' | 'M' | 'D' | 'h' | 'm' | 's')
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && number.bytes().any(|b| b != b'0')
}

/// The host name: `HOSTNAME`, else the kernel's.
fn host_name() -> Option<String> {
    let from_kernel = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let name = std::env::var("HOSTNAME").ok().filter(|n| !n.trim().is_empty()).or_else(from_kernel)?;
    Some(name.trim().to_string()).filter(|n| !n.is_empty())
}

/// What the worker demands of jobs beyond their content: who may score what, where results may go,
/// and payload encryption (docs/SECURITY.md). Everything is off by default: any job is scored,
/// whoever sent it, in plaintext or encrypted with a known key, and its result goes to any
/// `reply_to` it names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    /// Every job must carry the AMQP `user_id` property (the broker user that published it, which
    /// RabbitMQ checks); a job without is answered `forbidden`. A model whose config.yaml lists
    /// `allowed_publishers` demands it either way.
    pub require_user_id: bool,
    /// Publishers counted by name in `batchscore_jobs_received_total{publisher}`, besides those
    /// named in `reply_to.publishers` and in a served model's `allowed_publishers`; every other
    /// user counts as `other`, a job without `user_id` as `none`.
    pub known_publishers: Vec<String>,
    /// The reply queues each publisher may name.
    pub reply_to: ReplyToSettings,
    /// Payload encryption: key id → file holding that AES-256 key (32 raw bytes, 64 hex digits or
    /// base64 of 32 bytes). A job may come encrypted with any of them (headers `x-encryption:
    /// aes-256-gcm` and `x-key-id`); its result is encrypted with the same key. Several keys
    /// allow rotation. Ids are 1 to 64 characters of `a-z`, `0-9`, `.`, `_`, `-`. The files are
    /// read at start-up (crate::payload); only the paths are kept here.
    pub payload_keys: BTreeMap<String, PathBuf>,
    /// Refuse jobs that come in plaintext, with error `forbidden`; needs `payload_keys`.
    pub require_encryption: bool,
}

/// `security.reply_to`: patterns of the queues a publisher may name in `reply_to`. `*` stands for
/// any run of characters, `{user}` for the publisher's user; nothing else is special. With no
/// pattern at all (the default), any queue may be named. Once one is set, a job whose `reply_to`
/// does not match its publisher's pattern (its own, else `default`) is `forbidden`, and so is one
/// from a publisher that has neither; a job without `reply_to` is always allowed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplyToSettings {
    /// The pattern of every publisher without one of its own, e.g. `{user}.results*`.
    pub default: Option<String>,
    /// Publishers' own patterns, by broker user name, e.g. `risk-nightly: risk.*`.
    pub publishers: BTreeMap<String, String>,
}

impl SecuritySettings {
    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, problem: String| Err(SettingsError::Invalid { key, problem });
        for name in &self.known_publishers {
            if let Some(problem) = unusable_publisher(name) {
                return invalid("security.known_publishers", problem);
            }
        }
        if let Some(pattern) = &self.reply_to.default {
            if let Some(problem) = unusable_pattern(pattern) {
                return invalid("security.reply_to.default", problem);
            }
        }
        for (publisher, pattern) in &self.reply_to.publishers {
            if let Some(problem) = unusable_publisher(publisher) {
                return invalid("security.reply_to.publishers", problem);
            }
            if let Some(problem) = unusable_pattern(pattern) {
                return invalid("security.reply_to.publishers", format!("{publisher}: {problem}"));
            }
        }
        Ok(())
    }
}

/// Why `name` cannot name a publisher: empty, or a label the metrics give to others.
fn unusable_publisher(name: &str) -> Option<String> {
    match name {
        "" => Some("holds an empty user name".into()),
        "none" | "other" => Some(format!(
            "names a user {name:?}, which the publisher label of batchscore_jobs_received_total keeps for jobs \
             without user_id (none) and unnamed publishers (other)"
        )),
        _ => None,
    }
}

/// Why a `security.reply_to` pattern would not do what its writer meant.
fn unusable_pattern(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("is an empty pattern, which no reply queue matches; write * to allow any queue".into());
    }
    if pattern.replace("{user}", "").contains(['{', '}']) {
        return Some(format!(
            "pattern {pattern:?} has a brace that is not part of {{user}}, the one placeholder there is"
        ));
    }
    None
}

impl Settings {
    /// Reads `path` (which must exist when `required`), then environment overrides, then the
    /// secret files they name; then validates.
    pub fn load(path: &Path, required: bool) -> Result<Self, SettingsError> {
        let load_error = |source| SettingsError::Load { path: path.to_path_buf(), source };
        let sources = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Yaml).required(required))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX).prefix_separator("__").separator("__").try_parsing(true),
            )
            .build()
            .map_err(load_error)?;
        // Whether the file or the environment set amqp.url, which amqp.url_file may not meet.
        let url_given = sources.get_string("amqp.url").is_ok();
        let mut settings: Settings = sources.try_deserialize().map_err(load_error)?;
        settings.amqp.resolve_secrets(url_given)?;
        settings.audit.resolve_worker_id();
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, problem: &str| Err(SettingsError::Invalid { key, problem: problem.to_string() });
        let amqps = self.amqp.url.starts_with("amqps://");
        if !(amqps || self.amqp.url.starts_with("amqp://")) {
            return invalid(self.amqp.url_key(), "must start with amqp:// or amqps://");
        }
        let tls = &self.amqp.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return invalid(
                "amqp.tls.key_file",
                "and amqp.tls.cert_file go together: set both (the client certificate and its key) or neither",
            );
        }
        if tls.is_set() && !amqps {
            return invalid(
                "amqp.tls",
                "is set, but the broker URI is amqp:// and would not use it: use amqps:// (or remove amqp.tls)",
            );
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
        if self.security.require_encryption && self.security.payload_keys.is_empty() {
            return invalid(
                "security.require_encryption",
                "needs at least one key in security.payload_keys to decrypt jobs with",
            );
        }
        if self.metrics_addr().is_err() {
            return invalid("metrics.listen", "must be host:port, e.g. 0.0.0.0:9464 (port 0 picks a free port)");
        }
        self.security.validate()?;
        self.audit.validate(&self.amqp)
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
        assert_eq!(settings.models.archive(), None, "no archive unless one is set");
        assert_eq!(settings.batching, BatchingSettings::default());
        let (amqp, defaults) = (&settings.amqp, AmqpSettings::default());
        // The environment may point the suite at another broker.
        if std::env::var_os("BATCHSCORE__AMQP__URL").is_none() {
            assert_eq!(amqp.url, defaults.url);
        }
        assert_eq!((&amqp.url_file, &amqp.password_file, amqp.allow_plaintext), (&None, &None, false));
        assert_eq!((&amqp.tls.ca_file, &amqp.tls.cert_file, &amqp.tls.key_file), (&None, &None, &None));
        // Authorization is off, so the demo's guest jobs are scored.
        let security = &settings.security;
        assert!(!security.require_user_id && security.known_publishers.is_empty());
        assert_eq!((&security.reply_to.default, security.reply_to.publishers.len()), (&None, 0));
        assert!(settings.security.payload_keys.is_empty() && !settings.security.require_encryption);
    }

    /// A directory of its own with `settings.yaml` holding `yaml`, and the secret files `files`.
    fn write_settings(yaml: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("batchscore-settings-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let yaml = yaml.replace("$DIR", &dir.display().to_string());
        std::fs::write(dir.join("settings.yaml"), yaml).expect("settings file");
        for (name, content) in files {
            std::fs::write(dir.join(name), content).expect("secret file");
        }
        dir
    }

    fn load_in(dir: &Path) -> Result<Settings, SettingsError> {
        let loaded = Settings::load(&dir.join("settings.yaml"), true);
        let _ = std::fs::remove_dir_all(dir);
        loaded
    }

    #[test]
    fn password_file_replaces_the_password_and_stays_out_of_debug() {
        let dir = write_settings(
            "amqp:\n  url: amqps://scorer:placeholder@broker.example:5671/risk\n  password_file: $DIR/password\n",
            &[("password", "s3cret/with@odd:chars%\n")],
        );
        let settings = load_in(&dir).expect("loads");
        assert_eq!(settings.amqp.url, "amqps://scorer:s3cret%2Fwith%40odd%3Achars%25@broker.example:5671/risk");
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret") && shown.contains("amqps://scorer:***@broker.example:5671/risk"), "{shown}");
    }

    #[test]
    fn url_file_gives_the_whole_uri() {
        let dir = write_settings(
            "amqp:\n  url_file: $DIR/url\n",
            &[("url", "amqps://scorer:from-file@broker.example:5671/risk\r\n")],
        );
        assert_eq!(load_in(&dir).expect("loads").amqp.url, "amqps://scorer:from-file@broker.example:5671/risk");
    }

    #[test]
    fn url_file_and_url_together_are_refused() {
        let dir = write_settings(
            "amqp:\n  url: amqps://scorer:x@broker.example/risk\n  url_file: $DIR/url\n",
            &[("url", "amqps://scorer:from-file@broker.example:5671/risk\n")],
        );
        let message = load_in(&dir).expect_err("refused").to_string();
        assert!(message.contains("amqp.url_file") && message.contains("amqp.url "), "{message}");
        assert!(message.contains(&format!("{}", dir.join("url").display())), "names the file: {message}");
        assert!(!message.contains("from-file"), "{message}");
    }

    #[test]
    fn a_missing_secret_file_is_named_with_its_key() {
        let dir = write_settings("amqp:\n  password_file: $DIR/absent\n", &[]);
        let error = load_in(&dir).expect_err("refused");
        let message = error.to_string();
        assert!(matches!(error, SettingsError::SecretFile { key: "amqp.password_file", .. }), "{message}");
        assert!(message.contains("/absent") && message.contains("No such file"), "{message}");
    }

    #[test]
    fn a_password_file_needs_a_user_in_the_uri() {
        let dir = write_settings(
            "amqp:\n  url: amqps://broker.example/risk\n  password_file: $DIR/password\n",
            &[("password", "s3cret\n")],
        );
        let message = load_in(&dir).expect_err("refused").to_string();
        assert!(message.contains("amqp.password_file") && message.contains("user name"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
    }

    #[test]
    fn tls_settings_are_checked_together() {
        let dir = write_settings("amqp:\n  url: amqps://broker.example/risk\n  tls:\n    cert_file: /c.pem\n", &[]);
        assert!(load_in(&dir).expect_err("refused").to_string().contains("amqp.tls.key_file"));
        let dir = write_settings("amqp:\n  url: amqp://localhost/risk\n  tls:\n    ca_file: /ca.pem\n", &[]);
        assert!(load_in(&dir).expect_err("refused").to_string().contains("amqps://"));
    }

    #[test]
    fn payload_keys_are_paths_by_key_id_and_required_encryption_needs_one() {
        let dir = write_settings(
            "security:\n  payload_keys:\n    2025-q1: /run/secrets/q1.key\n    risk.nightly_v2: /run/secrets/q2.key\n  \
             require_encryption: true\n",
            &[],
        );
        let security = load_in(&dir).expect("loads").security;
        assert_eq!(security.payload_keys.get("risk.nightly_v2"), Some(&PathBuf::from("/run/secrets/q2.key")));
        assert_eq!(security.payload_keys.len(), 2);
        assert!(security.require_encryption);
        let dir = write_settings("security:\n  require_encryption: true\n", &[]);
        let message = load_in(&dir).expect_err("refused").to_string();
        assert!(message.contains("security.require_encryption") && message.contains("payload_keys"), "{message}");
    }

    #[test]
    fn security_settings_read_publishers_by_their_user_names() {
        let dir = write_settings(
            "security:\n  require_user_id: true\n  known_publishers: [batch-ops]\n  reply_to:\n    default: \
             \"{user}.results*\"\n    publishers:\n      risk-nightly: \"risk.*\"\n      CN=Core.Banking: \"core.*\"\n",
            &[],
        );
        let security = load_in(&dir).expect("loads").security;
        assert!(security.require_user_id);
        assert_eq!(security.known_publishers, ["batch-ops"]);
        assert_eq!(security.reply_to.default.as_deref(), Some("{user}.results*"));
        let publishers: Vec<_> = security.reply_to.publishers.iter().map(|(u, p)| (u.as_str(), p.as_str())).collect();
        assert_eq!(publishers, [("CN=Core.Banking", "core.*"), ("risk-nightly", "risk.*")], "names kept as written");
    }

    /// Asserts the settings `yaml` are refused with a message naming `key` and saying `needle`.
    fn refused(yaml: &str, key: &str, needle: &str) {
        let message = load_in(&write_settings(yaml, &[])).expect_err("refused").to_string();
        assert!(message.contains(key) && message.contains(needle), "{key}, {needle}: {message}");
    }

    #[test]
    fn unusable_security_settings_name_their_key() {
        refused("security:\n  reply_to:\n    default: \"{username}.results\"\n", "security.reply_to.default", "{user}");
        refused("security:\n  reply_to:\n    default: \"\"\n", "security.reply_to.default", "empty pattern");
        refused(
            "security:\n  reply_to:\n    publishers:\n      risk-nightly: \"risk.{run}\"\n",
            "security.reply_to.publishers",
            "risk-nightly",
        );
        refused("security:\n  known_publishers: [other]\n", "security.known_publishers", "other");
        refused("security:\n  reply_to:\n    publishers:\n      none: \"x\"\n", "security.reply_to.publishers", "none");
    }

    #[test]
    fn audit_settings_default_off_and_unusable_ones_name_their_key() {
        let audit = load_in(&write_settings("logging:\n  level: info\n", &[])).expect("defaults load").audit;
        assert!(!audit.enabled && audit.include_outputs && !audit.include_inputs);
        assert_eq!((audit.stream.as_str(), audit.max_age.as_str()), ("scoring.audit", "2555D"));
        assert!(!audit.worker_id.is_empty(), "the host name names the chain");
        for age in ["7 years", "2555", "D", "0D", "12d", "-3D"] {
            refused(&format!("audit:\n  max_age: \"{age}\"\n"), "audit.max_age", "2555D");
        }
        refused("audit:\n  max_bytes: 0\n", "audit.max_bytes", "at least 1");
        refused("audit:\n  stream: scoring.results\n", "audit.stream", "name of its own");
        refused("audit:\n  stream: \"\"\n", "audit.stream", "1 to 255 bytes");
        refused("audit:\n  worker_id: \"two words\"\n", "audit.worker_id", "without spaces");
        for age in ["1Y", "84M", "2555D", "36h", "90m", "3600s"] {
            let yaml = format!("audit:\n  enabled: true\n  max_age: {age}\n  worker_id: w-1\n");
            assert_eq!(load_in(&write_settings(&yaml, &[])).expect("loads").audit.max_age, age);
        }
    }

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(redact("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert_eq!(
            redact("amqps://u:p/w?d@h:5671/v?auth_mechanism=external"),
            "amqps://u:***@h:5671/v?auth_mechanism=external"
        );
    }

    #[test]
    fn invalid_value_names_its_key() {
        let mut settings = Settings::load(Path::new("/nonexistent.yaml"), false).expect("defaults load");
        settings.batching.max_batch_rows = 0;
        let message = settings.validate().expect_err("zero rows is invalid").to_string();
        assert!(message.contains("batching.max_batch_rows"), "{message}");
    }

    #[test]
    fn the_audit_database_password_comes_from_its_file_and_stays_out_of_debug() {
        let dir = write_settings(
            "audit:\n  database: postgres://sink:placeholder@db.example:5432/audit\n  database_password_file: \
             $DIR/db-password\n",
            &[("db-password", "s3cret@odd\n")],
        );
        // Read when the sink asks for the URL, not at load: the directory stays until then.
        let audit = Settings::load(&dir.join("settings.yaml"), true).expect("loads").audit;
        let url = audit.database_url(None).expect("a URL");
        assert_eq!(url, "postgres://sink:s3cret%40odd@db.example:5432/audit");
        let given = audit.database_url(Some("postgres://other@localhost/audit")).expect("--database wins");
        assert_eq!(given, "postgres://other:s3cret%40odd@localhost/audit");
        let _ = std::fs::remove_dir_all(&dir);
        let shown = format!("{audit:?}");
        assert!(!shown.contains("placeholder") && !shown.contains("s3cret"), "{shown}");
        let none = AuditSettings::default().database_url(None).expect_err("no database");
        assert!(none.to_string().contains("audit.database"), "{none}");
        refused("audit:\n  database: mysql://db/audit\n", "audit.database", "postgres://");
    }
}

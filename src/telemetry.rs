//! Telemetry in one place: logging set-up, every metric name with its help text and buckets,
//! and the HTTP listener for `/metrics`, `/healthz` and `/readyz`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::settings::{LogFormat, LoggingSettings};

pub const JOBS_RECEIVED: &str = "batchscore_jobs_received_total";
pub const JOBS_COMPLETED: &str = "batchscore_jobs_completed_total";
pub const JOB_ERRORS: &str = "batchscore_job_errors_total";
pub const ROWS_SCORED: &str = "batchscore_rows_scored_total";
pub const BATCHES: &str = "batchscore_batches_total";
pub const BROKER_RECONNECTS: &str = "batchscore_broker_reconnects_total";
pub const STAGE_FAILURES: &str = "batchscore_stage_failures_total";
pub const DEAD_LETTERED: &str = "batchscore_dead_lettered_total";
pub const MODEL_LOAD_FAILURES: &str = "batchscore_model_load_failures_total";
pub const MODEL_ARCHIVE_FAILURES: &str = "batchscore_model_archive_failures_total";
pub const JOB_DURATION: &str = "batchscore_job_duration_seconds";
pub const QUEUE_WAIT: &str = "batchscore_queue_wait_seconds";
pub const BATCH_WAIT: &str = "batchscore_batch_wait_seconds";
pub const INFERENCE_DURATION: &str = "batchscore_inference_duration_seconds";
pub const PUBLISH_DURATION: &str = "batchscore_publish_duration_seconds";
pub const BATCH_ROWS: &str = "batchscore_batch_rows";
pub const BATCH_JOBS: &str = "batchscore_batch_jobs";
pub const INFLIGHT_JOBS: &str = "batchscore_inflight_jobs";
pub const INFLIGHT_ROWS: &str = "batchscore_inflight_rows";
pub const SESSIONS_BUSY: &str = "batchscore_sessions_busy";
pub const SESSIONS_IDLE: &str = "batchscore_sessions_idle";
pub const MODEL_INFO: &str = "batchscore_model_info";
pub const BROKER_CONNECTED: &str = "batchscore_broker_connected";
pub const READY: &str = "batchscore_ready";

/// `model` label of jobs whose model is not in the repository: keeps the label set bounded.
pub const UNKNOWN_MODEL_LABEL: &str = "unknown";

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const SIZE_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// Filter of the client commands (`submit`, `models`, `inspect`) when `RUST_LOG` is unset.
pub const CLIENT_LOG_LEVEL: &str = "warn";

/// How often the recorder's upkeep folds recorded histogram samples into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the worker's log subscriber (filter `logging.level`, or `RUST_LOG` when set) once
/// per process; later calls are no-ops.
pub fn init_logging(settings: &LoggingSettings) {
    install_logging(settings.format, &settings.level);
}

/// Installs the log subscriber of a client command: warnings and errors only, so the command's
/// output is not buried under progress lines; `RUST_LOG` still wins.
pub fn init_client_logging(settings: &LoggingSettings) {
    install_logging(settings.format, CLIENT_LOG_LEVEL);
}

fn install_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(with_quiet_transport(default_filter)));
    // Colour codes only for a person watching a terminal: in a file, a pipe or a log collector
    // they are noise that breaks grep and JSON parsers.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `filter` with the AMQP client's own log lines off, unless it names them. lapin logs an
/// ordinary disconnect as an ERROR of its own; the worker reports every broker problem itself,
/// once, with what it does next (retry in how long, or exit), so lapin's lines would only be
/// misleading duplicates. `RUST_LOG=lapin=debug` (or a `lapin` directive in `logging.level`)
/// shows them.
fn with_quiet_transport(filter: &str) -> String {
    if filter.contains("lapin") {
        filter.to_string()
    } else {
        format!("{filter},lapin=off")
    }
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use together with its upkeep.
///
/// The recorder keeps every histogram sample until something drains them into the buckets; a
/// scrape does, and so does the upkeep started here every [`UPKEEP_INTERVAL`], so memory stays
/// flat however long nothing scrapes (`install_recorder` leaves the upkeep to its caller).
pub fn recorder() -> &'static PrometheusHandle {
    RECORDER.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), SIZE_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_JOBS.into()), SIZE_BUCKETS))
            .and_then(|b| b.install_recorder())
            // Invariant: the bucket lists are non-empty constants and this is the only recorder.
            .expect("Prometheus recorder installs once");
        describe();
        start_upkeep(handle.clone());
        handle
    })
}

/// Runs the recorder's upkeep on its own thread for the life of the process.
///
/// A thread rather than a tokio task: the recorder is installed wherever metrics are first
/// needed, inside or outside a runtime, and the upkeep must outlive any one runtime. It holds no
/// resource that needs releasing, so nothing joins it; process exit ends it.
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(UPKEEP_INTERVAL);
        handle.run_upkeep();
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the metrics upkeep thread; histogram samples are only released by \
            scrapes of /metrics, so scrape regularly or free memory and threads for the worker");
    }
}

fn describe() {
    describe_counter!(JOBS_RECEIVED, "Jobs taken from a lane's queue, by model, lane and publisher.");
    describe_counter!(JOBS_COMPLETED, "Jobs answered, by model, lane and status (ok, error, expired).");
    describe_counter!(JOB_ERRORS, "Jobs answered with an error, by error code.");
    describe_counter!(ROWS_SCORED, Unit::Count, "Rows scored, by model.");
    describe_counter!(BATCHES, "ONNX Runtime runs, by model, version and the reason the batch closed.");
    describe_counter!(BROKER_RECONNECTS, "Reconnections to RabbitMQ after a lost connection.");
    describe_counter!(
        STAGE_FAILURES,
        "Pipeline stages that failed or panicked, by stage; each tears the pipeline down and rebuilds it."
    );
    describe_counter!(DEAD_LETTERED, "Jobs copied to the dead-letter exchange, by error code.");
    describe_counter!(MODEL_LOAD_FAILURES, "Model versions that could not be loaded, by model.");
    describe_counter!(
        MODEL_ARCHIVE_FAILURES,
        "Model versions served whose files could not be written to the model archive (models.archive), by model."
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "End-to-end job latency: from the AMQP timestamp (else receipt) to the encoded result."
    );
    describe_histogram!(QUEUE_WAIT, Unit::Seconds, "Time jobs waited in RabbitMQ: from the AMQP timestamp to receipt.");
    describe_histogram!(BATCH_WAIT, Unit::Seconds, "Time from a job's receipt until its last batch started running.");
    describe_histogram!(INFERENCE_DURATION, Unit::Seconds, "Duration of one ONNX Runtime run.");
    describe_histogram!(PUBLISH_DURATION, Unit::Seconds, "Time from publishing a result to the broker's confirm.");
    describe_histogram!(BATCH_ROWS, Unit::Count, "Rows per ONNX Runtime run.");
    describe_histogram!(BATCH_JOBS, Unit::Count, "Jobs (or parts of jobs) per ONNX Runtime run.");
    describe_gauge!(INFLIGHT_JOBS, "Jobs received and not yet acknowledged.");
    describe_gauge!(INFLIGHT_ROWS, "Rows of jobs received and not yet acknowledged.");
    describe_gauge!(SESSIONS_BUSY, "ONNX Runtime sessions running a batch, by model and version.");
    describe_gauge!(SESSIONS_IDLE, "ONNX Runtime sessions waiting for a batch, by model and version.");
    describe_gauge!(
        MODEL_INFO,
        "1 for every model version serving, 0 once retired; with the sha256 of its file and its execution provider."
    );
    describe_gauge!(BROKER_CONNECTED, "1 while connected to RabbitMQ.");
    describe_gauge!(READY, "1 while the worker is ready to take jobs (what /readyz reports).");
}

/// A delivery taken from a lane's queue and decoded (scored or not: every job counts before it
/// can complete); `model` must be a repository name or [`UNKNOWN_MODEL_LABEL`], `publisher` one of
/// the bounded set `authz::PublisherLabels` gives.
pub fn record_job_received(model: &str, lane: &'static str, publisher: &str, queue_wait: Option<Duration>) {
    counter!(JOBS_RECEIVED, "model" => model.to_string(), "lane" => lane, "publisher" => publisher.to_string())
        .increment(1);
    if let Some(wait) = queue_wait {
        histogram!(QUEUE_WAIT, "lane" => lane).record(wait.as_secs_f64());
    }
}

/// A job answered with an error; `code` is the contract's error code.
pub fn record_job_error(code: &'static str) {
    counter!(JOB_ERRORS, "code" => code).increment(1);
}

/// A job whose result the broker confirmed and which was acknowledged; `model` must be a
/// repository name or [`UNKNOWN_MODEL_LABEL`].
pub fn record_job_done(model: &str, lane: &'static str, status: &'static str, rows: usize, duration: Duration) {
    counter!(JOBS_COMPLETED, "model" => model.to_string(), "lane" => lane, "status" => status).increment(1);
    if status == "ok" {
        counter!(ROWS_SCORED, "model" => model.to_string()).increment(rows as u64);
    }
    histogram!(JOB_DURATION, "model" => model.to_string(), "lane" => lane).record(duration.as_secs_f64());
}

pub fn record_batch_wait(model: &str, wait: Duration) {
    histogram!(BATCH_WAIT, "model" => model.to_string()).record(wait.as_secs_f64());
}

/// One run; `closed_by` says why its batch stopped taking rows (idle, size, delay, drain).
pub fn record_batch(model: &str, version: u64, rows: usize, jobs: usize, closed_by: &'static str, duration: Duration) {
    let version = version.to_string();
    histogram!(BATCH_ROWS, "model" => model.to_string(), "version" => version.clone()).record(rows as f64);
    histogram!(BATCH_JOBS, "model" => model.to_string(), "version" => version.clone()).record(jobs as f64);
    counter!(BATCHES, "model" => model.to_string(), "version" => version.clone(), "reason" => closed_by).increment(1);
    histogram!(INFERENCE_DURATION, "model" => model.to_string(), "version" => version).record(duration.as_secs_f64());
}

pub fn record_sessions(model: &str, version: u64, busy: usize, idle: usize) {
    let version = version.to_string();
    gauge!(SESSIONS_BUSY, "model" => model.to_string(), "version" => version.clone()).set(busy as f64);
    gauge!(SESSIONS_IDLE, "model" => model.to_string(), "version" => version).set(idle as f64);
}

pub fn record_model_loaded(model: &str, version: u64, sha256: &str, provider: &str) {
    model_info(model, version, sha256, provider).set(1.0);
    // Present from the start, so a rate over it works before the first failure.
    counter!(MODEL_LOAD_FAILURES, "model" => model.to_string()).absolute(0);
}

/// A served version's files are in the model archive: the failure counter of its model is
/// exported (at 0 until a failure), so `increase()` over it works before the first one.
pub fn record_model_archived(model: &str) {
    counter!(MODEL_ARCHIVE_FAILURES, "model" => model.to_string()).increment(0);
}

/// A served version's files could not be written to the model archive.
pub fn record_model_archive_failure(model: &str) {
    counter!(MODEL_ARCHIVE_FAILURES, "model" => model.to_string()).increment(1);
}

/// A version no longer serves new jobs (removed, replaced or outside its version policy).
pub fn record_model_retired(model: &str, version: u64, sha256: &str, provider: &str) {
    model_info(model, version, sha256, provider).set(0.0);
}

fn model_info(model: &str, version: u64, sha256: &str, provider: &str) -> metrics::Gauge {
    gauge!(MODEL_INFO, "model" => model.to_string(), "version" => version.to_string(),
        "sha256" => sha256.to_string(), "provider" => provider.to_string())
}

pub fn record_model_load_failure(model: &str) {
    counter!(MODEL_LOAD_FAILURES, "model" => model.to_string()).increment(1);
}

/// A job entered (`+1`) or left (`-1`, acknowledged or returned) the worker.
pub fn record_inflight(jobs: f64, rows: f64) {
    gauge!(INFLIGHT_JOBS).increment(jobs);
    gauge!(INFLIGHT_ROWS).increment(rows);
}

/// A new broker connection: deliveries of the old one are void, so nothing is in flight.
pub fn reset_inflight() {
    gauge!(INFLIGHT_JOBS).set(0.0);
    gauge!(INFLIGHT_ROWS).set(0.0);
}

pub fn record_dead_lettered(code: &'static str) {
    counter!(DEAD_LETTERED, "code" => code).increment(1);
}

pub fn record_publish(duration: Duration) {
    histogram!(PUBLISH_DURATION).record(duration.as_secs_f64());
}

/// A stage of the pipeline failed or panicked; `stage` is one of a fixed few names.
pub fn record_stage_failure(stage: &'static str) {
    counter!(STAGE_FAILURES, "stage" => stage).increment(1);
}

pub fn record_reconnect() {
    counter!(BROKER_RECONNECTS).increment(1);
}

/// Liveness and readiness, shared by the pipeline (writer) and the HTTP endpoints (readers).
#[derive(Debug, Clone, Default)]
pub struct Health {
    broker_connected: Arc<AtomicBool>,
}

impl Health {
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
        let value = if connected { 1.0 } else { 0.0 };
        gauge!(BROKER_CONNECTED).set(value);
        gauge!(READY).set(value);
    }

    /// Models are loaded before the worker starts consuming, so readiness is the broker link.
    pub fn ready(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
    }
}

/// Binds `addr` and serves the endpoints in the background; returns the bound address.
pub async fn serve(addr: SocketAddr, health: Health) -> std::io::Result<SocketAddr> {
    let handle = recorder();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok")))
        .route(
            "/readyz",
            get(move || {
                let ready = health.ready();
                std::future::ready(if ready {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                })
            }),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics listener stopped");
        }
    });
    Ok(bound)
}

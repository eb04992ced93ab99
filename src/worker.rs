//! The `worker` command: loads ONNX Runtime and every model, finds the worker's last audit
//! record when the trail is on, opens the metrics listener, then runs the pipeline, and the
//! model reloads, until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use ort::environment::Environment;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::amqp::{AmqpError, Endpoint};
use crate::audit::ChainEnds;
use crate::engine::archive::{self, ArchiveError};
use crate::engine::runtime::{self, RuntimeError};
use crate::engine::{repository::RepositoryError, Repository};
use crate::payload::{KeyError, Keyring};
use crate::settings::Settings;
use crate::telemetry::{self, Health};
use crate::{auditor, pipeline, reload};

/// Why a worker did not start. Every variant is a set-up problem a person must fix (the command
/// line exits 2), and each message names the setting involved.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The broker settings cannot work (the URI, the plaintext rule, a TLS file): found before the
    /// models load, so a wrong file fails start-up at once.
    #[error(transparent)]
    Broker(#[from] AmqpError),
    /// A key file of `security.payload_keys` is missing or not a 256-bit key.
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// `models.archive` names a folder that cannot be created or written.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// `metrics.listen` is not `host:port` (settings that were validated never get here).
    #[error("metrics.listen {listen:?} is not host:port; set metrics.listen / BATCHSCORE__METRICS__LISTEN to e.g. 0.0.0.0:9464")]
    MetricsAddress { listen: String },
    /// The message already carries the socket error, so the error is not also exposed as
    /// `source()`: printers that walk the chain (anyhow's `{:#}`) would print it twice.
    #[error(
        "cannot listen on {addr} (metrics.listen): {error}; \
         free the port or set metrics.listen / BATCHSCORE__METRICS__LISTEN to another host:port"
    )]
    Metrics { addr: SocketAddr, error: std::io::Error },
}

/// A worker whose models are loaded and whose endpoints are up, ready to consume.
pub struct Worker {
    settings: Settings,
    env: &'static Environment,
    repository: Arc<Repository>,
    keyring: Keyring,
    health: Health,
    pub metrics_addr: SocketAddr,
    /// The last confirmed audit record, named by the first record of each broker session's chain.
    ends: ChainEnds,
}

impl Worker {
    pub async fn start(settings: Settings) -> Result<Self, StartError> {
        // Debug-formatted settings show the broker URI without its password.
        tracing::debug!(?settings, "starting");
        Endpoint::resolve(&settings.amqp)?;
        let security = &settings.security;
        let keyring = Keyring::load(&security.payload_keys, security.require_encryption)?;
        if !security.payload_keys.is_empty() {
            tracing::info!(key_ids = ?keyring.ids(), require_encryption = security.require_encryption,
                "payload keys loaded");
        }
        // Before any model loads: a worker that could not archive what it serves must not start.
        if let Some(folder) = settings.models.archive() {
            archive::check(folder)?;
            tracing::info!(archive = %folder.display(), "model files are kept in the model archive");
        }
        // Installed first: metrics recorded while models load would otherwise be lost.
        telemetry::recorder();
        let env = runtime::environment(settings.onnxruntime.library_path.as_deref())?;
        let loading = {
            let settings = settings.clone();
            // Loading sessions reads and optimises model files: blocking work.
            tokio::task::spawn_blocking(move || Repository::load(env, &settings))
        };
        // The audit trail's first chain names this worker's last record: found meanwhile.
        let ends = ChainEnds::default();
        let ((), loaded) = tokio::join!(find_previous_chain(&settings, &ends), loading);
        let repository = loaded.unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))?;
        let health = Health::default();
        let addr = settings
            .metrics_addr()
            .map_err(|_| StartError::MetricsAddress { listen: settings.metrics.listen.clone() })?;
        let metrics_addr =
            telemetry::serve(addr, health.clone()).await.map_err(|error| StartError::Metrics { addr, error })?;
        tracing::info!(%metrics_addr, "serving /metrics, /healthz and /readyz");
        Ok(Self { settings, env, repository: Arc::new(repository), keyring, health, metrics_addr, ends })
    }

    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    /// Consumes until `shutdown` fires and in-flight jobs are drained. Fails only when the broker
    /// refuses the worker at start-up (credentials, vhost, TLS handshake: see
    /// [`AmqpError::is_refusal`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AmqpError> {
        let (snapshots, repository) = watch::channel(self.repository);
        let reloads = tokio::spawn(reload::run(self.env, self.settings.clone(), snapshots, shutdown.clone()));
        let outcome = pipeline::run(&self.settings, &self.keyring, repository, self.health, shutdown, self.ends).await;
        reloads.abort();
        outcome
    }
}

/// Fires the token on SIGINT or SIGTERM.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let interrupt = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT received; finishing in-flight jobs"),
            _ = terminate => tracing::info!("SIGTERM received; finishing in-flight jobs"),
        }
        shutdown.cancel();
    });
}

/// Looks in the audit stream's tail for this worker's last record, which its first chain then
/// names. Without it the chain names none: the trail is whole without the link, so a failed look
/// is logged, not fatal.
async fn find_previous_chain(settings: &Settings, ends: &ChainEnds) {
    if !settings.audit.enabled {
        return;
    }
    match auditor::tail::last_chain_end(&settings.amqp, &settings.audit).await {
        Ok(Some(end)) => {
            tracing::info!(previous_chain = %end.chain_id, seq = end.seq, "found this worker's last audit record");
            ends.found(end);
        }
        Ok(None) => tracing::info!(
            lookback_ms = settings.audit.previous_chain_lookback_ms,
            "no earlier audit record of this worker in the stream's tail; its first chain names none"
        ),
        Err(error) => {
            tracing::warn!(%error, "cannot read the audit stream's tail; the first chain names no previous chain")
        }
    }
}

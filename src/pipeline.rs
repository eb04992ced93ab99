//! Wires the stages together — consume → decode/validate → batch → infer → encode → publish →
//! ack — under one [`Supervisor`] per broker connection, and keeps the worker connected: a lost
//! connection or a failed stage tears every stage down, and they are rebuilt on a new connection
//! with backoff. Nothing else knows all the stages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::amqp::recorder::Trail;
use crate::amqp::{self, consumer::Consumer, AmqpError, Link};
use crate::audit::ChainEnds;
use crate::batcher::Batchers;
use crate::engine::Repository;
use crate::payload::Keyring;
use crate::result;
use crate::settings::Settings;
use crate::supervisor::{StageFailure, Supervisor, Watch};
use crate::telemetry::{self, Health};

/// Pause between the last acknowledgement and closing the channel at shutdown.
const SETTLE_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Stage(#[from] StageFailure),
    #[error("every stage ended although the worker was not stopping")]
    Ended,
}

/// Runs until `shutdown` fires, reconnecting whenever the broker connection is lost or a stage
/// fails. Jobs are scored by the versions of the latest `repository` snapshot. Returns an error
/// only when the broker refuses the worker before it ever connected (its credentials, vhost or
/// TLS handshake: [`AmqpError::is_refusal`]): the settings must change, so retrying would only
/// hide the problem.
pub async fn run(
    settings: &Settings,
    keyring: &Keyring,
    repository: watch::Receiver<Arc<Repository>>,
    health: Health,
    shutdown: CancellationToken,
    ends: ChainEnds,
) -> Result<(), AmqpError> {
    let max_backoff = Duration::from_millis(settings.amqp.reconnect_max_backoff_ms.max(100));
    let mut backoff = Duration::from_millis(100);
    let mut ever_connected = false;
    loop {
        let started = Instant::now();
        let session = Session { settings, keyring, health: &health, shutdown: &shutdown, ends: &ends };
        let outcome = serve(&session, repository.clone(), &mut ever_connected).await;
        health.set_broker_connected(false);
        let error = match outcome {
            Ok(()) => return Ok(()),
            Err(SessionError::Amqp(error)) if error.is_refusal() && !ever_connected => return Err(error),
            Err(error) => error,
        };
        if started.elapsed() > max_backoff {
            backoff = Duration::from_millis(100);
        }
        let pause = with_jitter(backoff);
        tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "no broker session; retrying");
        telemetry::record_reconnect();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// What every broker session of the worker shares.
struct Session<'a> {
    settings: &'a Settings,
    keyring: &'a Keyring,
    health: &'a Health,
    shutdown: &'a CancellationToken,
    ends: &'a ChainEnds,
}

/// One connection's worth of pipeline; returns when shutdown drained it, a stage failed or the
/// broker connection was lost.
async fn serve(
    session: &Session<'_>,
    repository: watch::Receiver<Arc<Repository>>,
    ever_connected: &mut bool,
) -> Result<(), SessionError> {
    let Session { settings, keyring, health, shutdown, ends } = *session;
    let link = Link::open(&settings.amqp, &settings.audit).await?;
    *ever_connected = true;
    health.set_broker_connected(true);
    telemetry::reset_inflight();

    let (stages, watch) = Supervisor::new();
    start_stages(settings, keyring, repository, &stages, &link, shutdown, ends);
    // The stages hold the spawner they need; this one would keep the pipeline from ending.
    drop(stages);
    let outcome = supervise(watch, shutdown, Duration::from_millis(settings.shutdown.timeout_ms)).await;
    if let Err(error) = &outcome {
        tracing::error!(%error, "tearing the pipeline down; unacknowledged jobs return to the queue");
    }
    health.set_broker_connected(false);
    if outcome.is_ok() {
        // A quorum queue applies acknowledgements asynchronously, and may handle the consumer's
        // channel going away before the last of them: those jobs would be redelivered although
        // answered. A short pause lets the queue settle them first.
        tokio::time::sleep(SETTLE_GRACE).await;
    }
    link.close().await;
    outcome
}

/// Spawns every stage of one pipeline, joined by bounded channels: consumer → batchers →
/// inference runs → result stage → publisher.
fn start_stages(
    settings: &Settings,
    keyring: &Keyring,
    repository: watch::Receiver<Arc<Repository>>,
    stages: &Supervisor,
    link: &Link,
    shutdown: &CancellationToken,
    ends: &ChainEnds,
) {
    let amqp = &settings.amqp;
    // Every delivery in the worker is a job held by at most one stage: the prefetches bound them.
    let (publish_tx, publish_rx) = mpsc::channel(usize::from(amqp.prefetch) + usize::from(amqp.bulk_prefetch));
    // One batch ahead per session (TEI's channel of one, per session).
    let (scored_tx, scored_rx) = mpsc::channel(settings.inference.sessions.max(2));
    let audit = settings.audit.enabled.then(|| Trail { settings: settings.audit.clone(), ends: ends.clone() });
    stages.spawn("publisher", amqp::publisher::run(link.publish_channel(), amqp.clone(), audit, publish_rx));
    stages.spawn("result", result::run(scored_rx, publish_tx.clone()));
    let snapshot = Arc::clone(&repository.borrow());
    let capacity = usize::from(amqp.prefetch.max(amqp.bulk_prefetch));
    let batchers = Batchers::new(&snapshot, settings.bulk_batching, scored_tx, capacity, stages.clone());
    let consumer = Consumer::new(settings.clone(), keyring.clone(), repository, batchers, publish_tx);
    stages.spawn("consumer", consumer.run(link.consume_channel(), shutdown.clone()));
}

/// Waits for the pipeline to end: drained after shutdown, or torn down at a stage's failure. A
/// drain that outlasts `drain_timeout` is torn down too, its jobs left to redelivery.
async fn supervise(
    mut watch: Watch,
    shutdown: &CancellationToken,
    drain_timeout: Duration,
) -> Result<(), SessionError> {
    let drain_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    let outcome = tokio::select! {
        ended = watch.ended() => match ended {
            Ok(()) if shutdown.is_cancelled() => Ok(()),
            Ok(()) => Err(SessionError::Ended),
            Err(failure) => {
                telemetry::record_stage_failure(failure.stage);
                Err(failure.into())
            }
        },
        () = drain_deadline => {
            tracing::warn!(
                timeout_ms = drain_timeout.as_millis() as u64,
                "in-flight jobs did not finish in time; they stay unacknowledged and will be redelivered"
            );
            Ok(())
        }
    };
    watch.tear_down();
    outcome
}

/// Up to a quarter more or less, so a fleet of workers does not reconnect in lockstep.
fn with_jitter(base: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    base.mul_f64(factor)
}

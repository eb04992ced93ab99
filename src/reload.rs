//! Keeps the served models current: checks the repository every `models.poll_interval_ms` and
//! on SIGHUP, loads and warms up new and replaced versions off the async threads, and hands the
//! next snapshot to the consumer. A version that fails to load never displaces one that serves.

use std::sync::Arc;
use std::time::Duration;

use ort::environment::Environment;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::repository::Refused;
use crate::engine::Repository;
use crate::settings::Settings;

/// Reloads until `shutdown` fires.
pub async fn run(
    env: &'static Environment,
    settings: Settings,
    snapshots: watch::Sender<Arc<Repository>>,
    shutdown: CancellationToken,
) {
    let settings = Arc::new(settings);
    let interval_ms = settings.models.poll_interval_ms;
    let mut poll = (interval_ms > 0).then(|| {
        let period = Duration::from_millis(interval_ms);
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // A slow load must not be followed by a burst of catch-up checks.
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll
    });
    let mut hangup = hangup_signal();
    let mut refused = Refused::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { poll.as_mut()?.tick().await; Some(()) }, if poll.is_some() => {}
            _ = async { hangup.as_mut()?.recv().await }, if hangup.is_some() => {
                tracing::info!("SIGHUP received; reloading the model repository");
            }
        }
        let current = Arc::clone(&snapshots.borrow());
        let settings = Arc::clone(&settings);
        let mut refused_so_far = std::mem::take(&mut refused);
        // Loading reads, optimises and warms up model files: blocking work.
        let reloaded = tokio::task::spawn_blocking(move || {
            let outcome = current.reload(env, &settings, &mut refused_so_far);
            (outcome, refused_so_far)
        })
        .await;
        let outcome = match reloaded {
            Ok((outcome, kept)) => {
                refused = kept;
                outcome
            }
            Err(join) => {
                tracing::error!(error = %join, "model reload crashed; the served versions stay as they are");
                continue;
            }
        };
        match outcome {
            Ok(Some(next)) => {
                let serving: Vec<String> = next.versions().map(|m| format!("{} v{}", m.name, m.version)).collect();
                tracing::info!(serving = %serving.join(", "), "model repository reloaded");
                snapshots.send_replace(Arc::new(next));
            }
            Ok(None) => tracing::debug!("model repository unchanged"),
            Err(error) => {
                tracing::error!(%error, "model repository not reloaded; the served versions stay as they are")
            }
        }
    }
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|error| tracing::warn!(%error, "cannot listen for SIGHUP; models reload by polling only"))
        .ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<NoSignal> {
    None
}

#[cfg(not(unix))]
struct NoSignal;

#[cfg(not(unix))]
impl NoSignal {
    async fn recv(&mut self) -> Option<()> {
        None
    }
}

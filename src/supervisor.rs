//! Owns every task of one connection's pipeline. Stages are spawned through a [`Supervisor`];
//! a stage that returns an error or panics is reported to the [`Watch`] and tears every other
//! stage down, so the pipeline is rebuilt instead of stalling with a stage missing. A stage that
//! returns `Ok` has drained: the pipeline is done once every stage has. A stage that stops
//! because a neighbouring stage is gone returns [`Gone`], which is not reported: the neighbour
//! reports its own end, and it alone is the cause.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A stage that ended before its pipeline was done with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {stage} stage {cause}")]
pub struct StageFailure {
    pub stage: &'static str,
    pub cause: String,
}

/// A stage stopped because the stage it feeds (or is fed by) is gone: not a failure of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a neighbouring stage is gone")]
pub struct Gone;

/// Spawns the stages of one pipeline; cheap to clone into the stages that spawn others.
#[derive(Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    teardown: CancellationToken,
    failures: mpsc::UnboundedSender<StageFailure>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Supervisor({} tasks)", self.tracker.len())
    }
}

/// The pipeline's view of its stages: the first failure, or the end of them all.
pub struct Watch {
    tracker: TaskTracker,
    teardown: CancellationToken,
    failures: mpsc::UnboundedReceiver<StageFailure>,
}

impl Supervisor {
    pub fn new() -> (Self, Watch) {
        let (failures, failed) = mpsc::unbounded_channel();
        let (tracker, teardown) = (TaskTracker::new(), CancellationToken::new());
        let watch = Watch { tracker: tracker.clone(), teardown: teardown.clone(), failures: failed };
        (Self { tracker, teardown, failures }, watch)
    }

    /// Runs `task` as the stage `stage` until it ends or the pipeline is torn down.
    pub fn spawn<F, E>(&self, stage: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + 'static,
    {
        let (teardown, failures) = (self.teardown.clone(), self.failures.clone());
        self.tracker.spawn(async move {
            // Unwind safety: a stage that panicked is never polled again, and the teardown that
            // follows drops everything it shared with the other stages.
            let ended = tokio::select! {
                biased;
                _ = teardown.cancelled() => return,
                ended = AssertUnwindSafe(task).catch_unwind() => ended,
            };
            let cause = match ended {
                Ok(Ok(())) => return,
                // The neighbour's own report (or the teardown it caused) says why.
                Ok(Err(error)) if (&error as &dyn std::any::Any).is::<Gone>() => return,
                Ok(Err(error)) => format!("failed: {error}"),
                Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
            };
            let _ = failures.send(StageFailure { stage, cause });
            teardown.cancel();
        });
    }
}

impl Watch {
    /// Completes when every stage has ended (`Ok`), or at the first failure (`Err`), after which
    /// the other stages are being torn down.
    pub async fn ended(&mut self) -> Result<(), StageFailure> {
        // Stages spawn further stages only while an earlier one still runs, so the tracker can
        // be closed now: it completes once the last stage has ended.
        self.tracker.close();
        tokio::select! {
            biased;
            Some(failure) = self.failures.recv() => Err(failure),
            () = self.tracker.wait() => match self.failures.try_recv() {
                Ok(failure) => Err(failure),
                Err(_) => Ok(()),
            },
        }
    }

    /// Stops every stage where it is; deliveries not yet acknowledged return to the queue when
    /// the connection closes.
    pub fn tear_down(&self) {
        self.teardown.cancel();
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("with a non-text payload")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_panicking_stage_is_reported_and_tears_the_others_down() {
        let (supervisor, mut watch) = Supervisor::new();
        let (_keep_open, mut never) = mpsc::channel::<()>(1);
        supervisor.spawn("waiting", async move {
            never.recv().await;
            Ok::<(), String>(())
        });
        supervisor.spawn("result", async {
            panic!("injected");
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        });
        let failure = tokio::time::timeout(PATIENCE, watch.ended()).await.expect("the failure is reported");
        assert_eq!(failure, Err(StageFailure { stage: "result", cause: "panicked: injected".into() }));
        tokio::time::timeout(PATIENCE, watch.tracker.wait()).await.expect("the waiting stage was torn down");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_failure_reported_is_the_cause_not_the_stages_that_lose_it() {
        for round in 0..50 {
            let (supervisor, mut watch) = Supervisor::new();
            let (to_result, mut scored) = mpsc::channel::<u32>(1);
            supervisor.spawn("result", async move {
                scored.recv().await;
                panic!("injected");
                #[allow(unreachable_code)]
                Ok::<(), String>(())
            });
            supervisor.spawn("inference", async move {
                for batch in 0_u32.. {
                    to_result.send(batch).await.map_err(|_| Gone)?;
                }
                Ok::<(), Gone>(())
            });
            let failure = tokio::time::timeout(PATIENCE, watch.ended()).await.expect("reported");
            assert_eq!(failure.map_err(|f| f.stage), Err("result"), "round {round}");
        }
    }

    #[tokio::test]
    async fn an_error_is_reported_with_its_stage() {
        let (supervisor, mut watch) = Supervisor::new();
        supervisor.spawn("publisher", async { Err("channel closed") });
        let failure = tokio::time::timeout(PATIENCE, watch.ended()).await.expect("the failure is reported");
        assert_eq!(failure.unwrap_err().to_string(), "the publisher stage failed: channel closed");
    }

    #[tokio::test]
    async fn a_stage_that_lost_its_neighbour_is_not_a_failure() {
        let (supervisor, mut watch) = Supervisor::new();
        supervisor.spawn("inference", async { Err(Gone) });
        drop(supervisor);
        let ended = tokio::time::timeout(PATIENCE, watch.ended()).await.expect("the pipeline ends");
        assert_eq!(ended, Ok(()));
    }

    #[tokio::test]
    async fn stages_that_drain_end_the_pipeline_cleanly() {
        let (supervisor, mut watch) = Supervisor::new();
        let spawner = supervisor.clone();
        supervisor.spawn("consumer", async move {
            spawner.spawn("batcher", async { Ok::<(), String>(()) });
            Ok::<(), String>(())
        });
        drop(supervisor);
        let ended = tokio::time::timeout(PATIENCE, watch.ended()).await.expect("the pipeline ends");
        assert_eq!(ended, Ok(()));
    }
}

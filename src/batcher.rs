//! The dynamic batcher of one model version: the sole owner of that model's pending rows.
//!
//! Rows of many jobs fill one ONNX Runtime run up to `max_batch_rows`; a larger job is split
//! across runs. A batch closes when a session is free (the engine is idle, so waiting would
//! only add latency), when it is full, or when its oldest rows waited `max_delay_ms` for a
//! busy engine; it then runs with what arrived while the previous batch ran.
//!
//! Online and bulk jobs wait apart: a batch is taken from the online rows whenever there are
//! any, so bulk rows only fill runs the online lane leaves free. [`Batchers`] keeps one batcher
//! per served model version.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::engine::{InferenceError, ModelVersion, Repository};
use crate::flow::{epoch_ms, Batch, CloseReason, Job, Lane, Rejection, ScoredBatch, Segment};
use crate::infer;
use crate::lanes;
use crate::settings::BatchingSettings;
use crate::supervisor::{Gone, Supervisor};

/// Jobs waiting for a batch, in arrival order, with how far each has been taken.
#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<(Job, usize, Instant)>,
    rows: usize,
}

impl Pending {
    pub fn push(&mut self, job: Job) {
        self.rows += job.meta.rows;
        self.queue.push_back((job, 0, Instant::now()));
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn oldest(&self) -> Option<Instant> {
        self.queue.front().map(|(_, _, at)| *at)
    }

    /// Takes up to `max_rows` rows in arrival order; a job too large for what is left is split.
    pub fn take(&mut self, max_rows: usize, n_features: usize, closed_by: CloseReason) -> Batch {
        // A lone whole job that fits is handed over without copying its rows.
        if let Some((job, 0, _)) = self.queue.front() {
            let fits_alone = job.meta.rows <= max_rows;
            let next_does_not = self.queue.get(1).is_none_or(|(next, ..)| job.meta.rows + next.meta.rows > max_rows);
            if fits_alone && next_does_not {
                let (job, ..) = self.queue.pop_front().expect("front exists: checked above");
                self.rows -= job.meta.rows;
                let rows = job.meta.rows;
                let segment = Segment { job: job.meta, job_offset: 0, batch_offset: 0, rows };
                return Batch { inputs: job.inputs, rows, segments: vec![segment], closed_by };
            }
        }
        let mut inputs = Vec::with_capacity(max_rows.min(self.rows) * n_features);
        let mut segments = Vec::new();
        let mut rows = 0;
        while rows < max_rows {
            let Some((job, taken, _)) = self.queue.front_mut() else { break };
            let count = (job.meta.rows - *taken).min(max_rows - rows);
            inputs.extend_from_slice(&job.inputs[*taken * n_features..(*taken + count) * n_features]);
            segments.push(Segment { job: job.meta.clone(), job_offset: *taken, batch_offset: rows, rows: count });
            *taken += count;
            rows += count;
            if *taken == job.meta.rows {
                self.queue.pop_front();
            }
        }
        self.rows -= rows;
        Batch { inputs, rows, segments, closed_by }
    }
}

/// Pending rows of both lanes; the online lane's are always taken first.
#[derive(Debug, Default)]
struct Lanes {
    online: Pending,
    bulk: Pending,
}

impl Lanes {
    fn is_empty(&self) -> bool {
        self.online.is_empty() && self.bulk.is_empty()
    }

    /// The lane the next batch comes from.
    fn next_lane(&self) -> Lane {
        lanes::next_batch(!self.online.is_empty(), !self.bulk.is_empty())
    }

    fn get(&mut self, lane: Lane) -> &mut Pending {
        match lane {
            Lane::Online => &mut self.online,
            Lane::Bulk => &mut self.bulk,
        }
    }
}

/// Forms batches for `model` until `jobs` closes and every pending row has been dispatched.
/// Online jobs batch by the model's profile, bulk jobs by `bulk`; a bulk batch being formed gives
/// way as soon as an online job arrives.
pub async fn run(
    model: Arc<ModelVersion>,
    bulk: BatchingSettings,
    mut jobs: mpsc::Receiver<Job>,
    scored: mpsc::Sender<ScoredBatch>,
    runs: Supervisor,
) -> Result<(), Gone> {
    let profile = |lane| match lane {
        Lane::Online => (model.batching.max_batch_rows, Duration::from_millis(model.batching.max_delay_ms)),
        Lane::Bulk => (bulk.max_batch_rows.max(1), Duration::from_millis(bulk.max_delay_ms)),
    };
    let mut pending = Lanes::default();
    let mut open = true;
    loop {
        if pending.is_empty() {
            match jobs.recv().await {
                Some(job) => admit(job, &mut pending, &scored).await?,
                None => break,
            }
        }
        while open && pending.online.rows() < model.batching.max_batch_rows {
            match jobs.try_recv() {
                Ok(job) => admit(job, &mut pending, &scored).await?,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let mut lane = pending.next_lane();
        let (session, closed_by) = loop {
            let (max_rows, max_delay) = profile(lane);
            let forming = pending.get(lane);
            if forming.rows() >= max_rows {
                break (model.session().await, CloseReason::Size);
            }
            let deadline = forming.oldest().unwrap_or_else(Instant::now) + max_delay;
            tokio::select! {
                biased;
                session = model.session() => break (session, if open { CloseReason::Idle } else { CloseReason::Drain }),
                job = jobs.recv(), if open => match job {
                    Some(job) => {
                        admit(job, &mut pending, &scored).await?;
                        lane = pending.next_lane();
                    }
                    None => open = false,
                },
                _ = sleep_until(deadline) => break (model.session().await, CloseReason::Delay),
            }
        };
        // A session was awaited: an online job that arrived meanwhile still goes first.
        let lane = pending.next_lane();
        let batch = pending.get(lane).take(profile(lane).0, model.signature.n_features, closed_by);
        match session {
            Ok(session) => infer::spawn(&runs, model.clone(), session, batch, scored.clone()),
            Err(error) => fail(batch, error, &scored).await?,
        }
        if !open && pending.is_empty() {
            break;
        }
    }
    Ok(())
}

/// Queues `job` for a batch, unless its deadline has passed: then it is answered `expired`.
async fn admit(job: Job, pending: &mut Lanes, scored: &mpsc::Sender<ScoredBatch>) -> Result<(), Gone> {
    let now_ms = epoch_ms();
    match job.meta.deadline_ms {
        Some(deadline) if deadline < now_ms => {
            let rows = job.meta.rows;
            let rejection = Rejection::Expired(format!(
                "the job's deadline passed {} ms before it could be scored",
                now_ms - deadline
            ));
            let segment = Segment { job: job.meta, job_offset: 0, batch_offset: 0, rows };
            scored.send(ScoredBatch::failed(vec![segment], rejection)).await.map_err(|_| Gone)
        }
        _ => {
            pending.get(job.meta.lane).push(job);
            Ok(())
        }
    }
}

async fn fail(batch: Batch, error: InferenceError, scored: &mpsc::Sender<ScoredBatch>) -> Result<(), Gone> {
    scored.send(ScoredBatch::failed(batch.segments, error.into())).await.map_err(|_| Gone)
}

/// One batcher per served model version, kept in step with the repository snapshot. Batchers and
/// their runs are stages of the pipeline's [`Supervisor`]; dropping this closes every batcher,
/// which then dispatches what it holds and ends.
pub struct Batchers {
    routes: HashMap<u64, mpsc::Sender<Job>>,
    scored: mpsc::Sender<ScoredBatch>,
    capacity: usize,
    bulk: BatchingSettings,
    stages: Supervisor,
}

impl Batchers {
    pub fn new(
        repository: &Repository,
        bulk: BatchingSettings,
        scored: mpsc::Sender<ScoredBatch>,
        capacity: usize,
        stages: Supervisor,
    ) -> Self {
        let mut batchers = Self { routes: HashMap::new(), scored, capacity, bulk, stages };
        batchers.sync(repository);
        batchers
    }

    /// Starts a batcher for every new version and closes those of versions no longer served:
    /// they batch what they hold, their runs finish, and their sessions go when the last job
    /// holding the version is answered.
    pub fn sync(&mut self, repository: &Repository) {
        let served: HashMap<u64, &Arc<ModelVersion>> = repository.versions().map(|m| (m.id, m)).collect();
        self.routes.retain(|id, _| served.contains_key(id));
        for model in served.into_values() {
            self.route(model);
        }
    }

    /// The batcher of `model`, started if it has none: a job decoded while its version was being
    /// retired is still scored by that version, whose batcher closes at the next sync.
    pub fn route(&mut self, model: &Arc<ModelVersion>) -> &mpsc::Sender<Job> {
        self.routes.entry(model.id).or_insert_with(|| {
            let (jobs_tx, jobs_rx) = mpsc::channel(self.capacity);
            let batcher = run(Arc::clone(model), self.bulk, jobs_rx, self.scored.clone(), self.stages.clone());
            self.stages.spawn("batcher", batcher);
            jobs_tx
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Rejection;
    use crate::supervisor::Watch;
    use crate::testing::{job, linear_model};

    /// Long enough that a test waiting for it would time out instead.
    const FOREVER_MS: u64 = 600_000;
    const PATIENCE: Duration = Duration::from_secs(30);

    struct Running {
        jobs: mpsc::Sender<Job>,
        scored: mpsc::Receiver<ScoredBatch>,
        _stages: (Supervisor, Watch),
    }

    fn start(model: &Arc<ModelVersion>) -> Running {
        let (jobs, jobs_rx) = mpsc::channel(16);
        let (scored_tx, scored) = mpsc::channel(16);
        let (stages, watch) = Supervisor::new();
        let bulk = BatchingSettings { max_batch_rows: 64, max_delay_ms: FOREVER_MS };
        stages.spawn("batcher", run(Arc::clone(model), bulk, jobs_rx, scored_tx, stages.clone()));
        Running { jobs, scored, _stages: (stages, watch) }
    }

    async fn next(running: &mut Running) -> ScoredBatch {
        tokio::time::timeout(PATIENCE, running.scored.recv()).await.expect("a batch in time").expect("a batch")
    }

    fn seqs(batch: &ScoredBatch) -> Vec<u64> {
        batch.segments.iter().map(|s| s.job.seq).collect()
    }

    /// The jobs of the next `n` runs, in the order the runs started: a run's outcome may reach
    /// the result stage after a later run's, but a run starts only once the previous one gave its
    /// session back, so start order is batch order on a single session.
    async fn runs_in_order(running: &mut Running, n: usize) -> Vec<Vec<u64>> {
        let mut batches = Vec::new();
        for _ in 0..n {
            batches.push(next(running).await);
        }
        batches.sort_by_key(|batch| batch.started_at);
        batches.iter().map(seqs).collect()
    }

    #[tokio::test]
    async fn an_idle_engine_takes_a_job_at_once() {
        let model = linear_model(1, BatchingSettings { max_batch_rows: 64, max_delay_ms: FOREVER_MS });
        let mut running = start(&model);
        running.jobs.send(job(&model, 1, 3, Lane::Online)).await.expect("batcher runs");
        // Waiting out max_delay_ms would outlast PATIENCE: the batch went because a session was free.
        let batch = next(&mut running).await;
        assert_eq!(seqs(&batch), [1]);
        assert!(batch.outcome.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_engine_batches_what_arrives_for_at_most_max_delay() {
        let model = linear_model(1, BatchingSettings { max_batch_rows: 64, max_delay_ms: 100 });
        let mut running = start(&model);
        let busy = model.session().await.expect("the only session");
        running.jobs.send(job(&model, 1, 1, Lane::Online)).await.expect("batcher runs");
        tokio::time::sleep(Duration::from_millis(99)).await;
        running.jobs.send(job(&model, 2, 1, Lane::Online)).await.expect("batcher runs");
        // 101 ms after the first job: its batch closed at 100 ms, so this one waits for the next.
        tokio::time::sleep(Duration::from_millis(2)).await;
        running.jobs.send(job(&model, 3, 1, Lane::Online)).await.expect("batcher runs");
        drop(busy);
        assert_eq!(runs_in_order(&mut running, 2).await, [vec![1, 2], vec![3]]);
    }

    #[tokio::test]
    async fn a_full_batch_goes_and_a_large_job_is_split() {
        let model = linear_model(1, BatchingSettings { max_batch_rows: 4, max_delay_ms: FOREVER_MS });
        let mut running = start(&model);
        running.jobs.send(job(&model, 1, 10, Lane::Online)).await.expect("batcher runs");
        let mut parts = Vec::new();
        while parts.iter().map(|(_, rows)| rows).sum::<usize>() < 10 {
            let batch = next(&mut running).await;
            assert_eq!(seqs(&batch), [1]);
            parts.push((batch.segments[0].job_offset, batch.segments[0].rows));
        }
        // Runs finish in any order; the result stage puts the parts back in row order.
        parts.sort();
        assert_eq!(parts, [(0, 4), (4, 4), (8, 2)]);
    }

    #[tokio::test]
    async fn online_rows_go_before_bulk_rows() {
        let model = linear_model(1, BatchingSettings { max_batch_rows: 64, max_delay_ms: FOREVER_MS });
        let mut running = start(&model);
        // On this single-threaded runtime the batcher first runs once both jobs are queued.
        running.jobs.send(job(&model, 1, 2, Lane::Bulk)).await.expect("batcher runs");
        running.jobs.send(job(&model, 2, 2, Lane::Online)).await.expect("batcher runs");
        assert_eq!(runs_in_order(&mut running, 2).await, [vec![2], vec![1]]);
    }

    #[tokio::test]
    async fn a_job_past_its_deadline_is_answered_expired_without_a_run() {
        let model = linear_model(1, BatchingSettings { max_batch_rows: 64, max_delay_ms: FOREVER_MS });
        let mut running = start(&model);
        let mut late = job(&model, 1, 2, Lane::Online);
        Arc::get_mut(&mut late.meta).expect("only holder").deadline_ms = Some(epoch_ms() - 1_000);
        running.jobs.send(late).await.expect("batcher runs");
        let batch = next(&mut running).await;
        assert_eq!(seqs(&batch), [1]);
        match &batch.outcome {
            Err(Rejection::Expired(message)) => assert!(message.contains("deadline passed"), "{message}"),
            other => panic!("expected an expired answer, got {other:?}"),
        }
        assert_eq!(batch.inference_time, Duration::ZERO, "no run");
    }
}

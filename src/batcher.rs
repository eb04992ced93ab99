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
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use crate::engine::{InferenceError, ModelVersion, Repository};
use crate::infer;
use crate::job::ErrorCode;
use crate::pipeline::{epoch_ms, Job, JobFailure, JobMeta, Lane, ScoredBatch};
use crate::settings::BatchingSettings;

/// Why a batch stopped taking rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A session was free.
    Idle,
    /// `max_batch_rows` reached.
    Size,
    /// The oldest rows waited `max_delay_ms` for a busy engine.
    Delay,
    /// The jobs channel closed (shutdown or reconnect): flushing what is left.
    Drain,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Size => "size",
            CloseReason::Delay => "delay",
            CloseReason::Drain => "drain",
        }
    }
}

/// A contiguous run of one job's rows inside a batch.
#[derive(Debug, Clone)]
pub struct Segment {
    pub job: Arc<JobMeta>,
    /// First row of this segment within its job.
    pub job_offset: usize,
    /// First row of this segment within the batch.
    pub batch_offset: usize,
    pub rows: usize,
}

impl Segment {
    pub fn is_whole_job(&self) -> bool {
        self.job_offset == 0 && self.rows == self.job.rows
    }
}

/// Rows ready for one session run: row-major inputs and where each job's rows sit.
#[derive(Debug)]
pub struct Batch {
    pub inputs: Vec<f32>,
    pub rows: usize,
    pub segments: Vec<Segment>,
    pub closed_by: CloseReason,
}

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
        if self.online.is_empty() && !self.bulk.is_empty() {
            Lane::Bulk
        } else {
            Lane::Online
        }
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
) {
    let profile = |lane| match lane {
        Lane::Online => (model.batching.max_batch_rows, Duration::from_millis(model.batching.max_delay_ms)),
        Lane::Bulk => (bulk.max_batch_rows.max(1), Duration::from_millis(bulk.max_delay_ms)),
    };
    let mut pending = Lanes::default();
    let mut open = true;
    loop {
        if pending.is_empty() {
            match jobs.recv().await {
                Some(job) => admit(job, &mut pending, &scored).await,
                None => break,
            }
        }
        while open && pending.online.rows() < model.batching.max_batch_rows {
            match jobs.try_recv() {
                Ok(job) => admit(job, &mut pending, &scored).await,
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
            let deadline = tokio::time::Instant::from_std(forming.oldest().unwrap_or_else(Instant::now) + max_delay);
            tokio::select! {
                biased;
                session = model.session() => break (session, if open { CloseReason::Idle } else { CloseReason::Drain }),
                job = jobs.recv(), if open => match job {
                    Some(job) => {
                        admit(job, &mut pending, &scored).await;
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
            Ok(session) => infer::spawn(model.clone(), session, batch, scored.clone()),
            Err(error) => fail(batch, error, &scored).await,
        }
        if !open && pending.is_empty() {
            break;
        }
    }
}

/// Queues `job` for a batch, unless its deadline has passed: then it is answered `expired`.
async fn admit(job: Job, pending: &mut Lanes, scored: &mpsc::Sender<ScoredBatch>) {
    let now_ms = epoch_ms();
    match job.meta.deadline_ms {
        Some(deadline) if deadline < now_ms => {
            let rows = job.meta.rows;
            let failure = JobFailure {
                code: ErrorCode::Expired,
                message: format!("the job's deadline passed {} ms before it could be scored", now_ms - deadline),
            };
            let segment = Segment { job: job.meta, job_offset: 0, batch_offset: 0, rows };
            let batch = Batch { inputs: Vec::new(), rows, segments: vec![segment], closed_by: CloseReason::Drain };
            // The result stage outlives every batcher; a closed channel means the worker is stopping.
            let _ = scored.send(ScoredBatch::failed(batch, failure)).await;
        }
        _ => pending.get(job.meta.original.lane).push(job),
    }
}

async fn fail(batch: Batch, error: InferenceError, scored: &mpsc::Sender<ScoredBatch>) {
    let failed = ScoredBatch::failed(batch, error.into());
    // The result stage outlives every batcher; a closed channel means the worker is stopping.
    let _ = scored.send(failed).await;
}

/// One batcher per served model version, kept in step with the repository snapshot.
pub struct Batchers {
    routes: HashMap<u64, mpsc::Sender<Job>>,
    scored: mpsc::Sender<ScoredBatch>,
    capacity: usize,
    bulk: BatchingSettings,
    tasks: JoinSet<()>,
}

impl Batchers {
    pub fn new(
        repository: &Repository,
        bulk: BatchingSettings,
        scored: mpsc::Sender<ScoredBatch>,
        capacity: usize,
    ) -> Self {
        let mut batchers = Self { routes: HashMap::new(), scored, capacity, bulk, tasks: JoinSet::new() };
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
            self.tasks.spawn(run(Arc::clone(model), self.bulk, jobs_rx, self.scored.clone()));
            jobs_tx
        })
    }

    /// Closes every batcher and waits until each has dispatched its last batch.
    pub async fn drain(self) {
        let Self { routes, scored, mut tasks, .. } = self;
        drop((routes, scored));
        while tasks.join_next().await.is_some() {}
    }
}

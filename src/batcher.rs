//! The dynamic batcher of one model version: the sole owner of that model's pending rows.
//!
//! Rows of many jobs fill one ONNX Runtime run up to `max_batch_rows`; a larger job is split
//! across runs. A batch closes when a session is free (the engine is idle, so waiting would
//! only add latency), when it is full, or when its oldest rows waited `max_delay_ms` for a
//! busy engine; it then runs with what arrived while the previous batch ran.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::time::sleep_until;

use crate::engine::{InferenceError, ModelVersion};
use crate::infer;
use crate::job::ErrorCode;
use crate::pipeline::{epoch_ms, Job, JobFailure, JobMeta, ScoredBatch};

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

/// Forms batches for `model` until `jobs` closes and every pending row has been dispatched.
pub async fn run(model: Arc<ModelVersion>, mut jobs: mpsc::Receiver<Job>, scored: mpsc::Sender<ScoredBatch>) {
    let max_rows = model.batching.max_batch_rows;
    let max_delay = Duration::from_millis(model.batching.max_delay_ms);
    let mut pending = Pending::default();
    let mut open = true;
    loop {
        if pending.is_empty() {
            match jobs.recv().await {
                Some(job) => admit(job, &mut pending, &scored).await,
                None => break,
            }
        }
        while open && pending.rows() < max_rows {
            match jobs.try_recv() {
                Ok(job) => admit(job, &mut pending, &scored).await,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let deadline = tokio::time::Instant::from_std(pending.oldest().unwrap_or_else(Instant::now) + max_delay);
        let (session, closed_by) = loop {
            if pending.rows() >= max_rows {
                break (model.session().await, CloseReason::Size);
            }
            tokio::select! {
                biased;
                session = model.session() => break (session, if open { CloseReason::Idle } else { CloseReason::Drain }),
                job = jobs.recv(), if open => match job {
                    Some(job) => admit(job, &mut pending, &scored).await,
                    None => open = false,
                },
                _ = sleep_until(deadline) => break (model.session().await, CloseReason::Delay),
            }
        };
        let batch = pending.take(max_rows, model.signature.n_features, closed_by);
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
async fn admit(job: Job, pending: &mut Pending, scored: &mpsc::Sender<ScoredBatch>) {
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
        _ => pending.push(job),
    }
}

async fn fail(batch: Batch, error: InferenceError, scored: &mpsc::Sender<ScoredBatch>) {
    let failed = ScoredBatch::failed(batch, error.into());
    // The result stage outlives every batcher; a closed channel means the worker is stopping.
    let _ = scored.send(failed).await;
}

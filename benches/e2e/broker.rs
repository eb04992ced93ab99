//! The driver's side of RabbitMQ: per-measurement queue names, declaring them as the worker
//! does, publishing jobs (pre-filled or on a schedule) and collecting results.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use batchscore::payload::PayloadKey;
use batchscore::settings::AmqpSettings;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde::Deserialize;
use tokio::task::JoinHandle;

use crate::engine::Reference;
use crate::jobs::{self, Job};

/// Jobs whose confirms may be outstanding before the oldest are awaited.
const CONFIRM_WINDOW: usize = 2_000;
/// Bytes of job bodies handed to the client library at once while pre-filling.
const PIPELINE_BYTES: usize = 8 << 20;
/// Results whose probabilities are compared with the in-process scores, and rows of each.
const SPOT_JOBS: usize = 10;
const SPOT_ROWS: usize = 5;
/// Float32 scores may differ in their last bits with the batch they ran in.
const SPOT_TOLERANCE: f64 = 1e-5;

/// The queues and exchange of one measurement, named like the worker's settings.
#[derive(Debug, Clone)]
pub struct Topology {
    /// What every name of this measurement starts with.
    prefix: String,
    pub amqp: AmqpSettings,
    /// The bulk lane's jobs queue, for workers that have one.
    pub bulk_queue: Option<String>,
    /// The audit stream of a worker with the audit trail on, which the worker declares.
    pub audit_stream: Option<String>,
}

impl Topology {
    pub fn new(base: &AmqpSettings, prefix: &str, bulk_lane: bool) -> Self {
        let amqp = AmqpSettings {
            jobs_queue: format!("{prefix}.jobs"),
            results_queue: format!("{prefix}.results"),
            dead_letter_exchange: format!("{prefix}.dlx"),
            dead_letter_queue: format!("{prefix}.dlq"),
            ..base.clone()
        };
        let bulk_queue = bulk_lane.then(|| format!("{prefix}.bulk"));
        Self { prefix: prefix.to_string(), amqp, bulk_queue, audit_stream: None }
    }

    /// These queues and an audit stream of their own, `<prefix>.audit`.
    pub fn with_audit_stream(self) -> Self {
        Self { audit_stream: Some(self.name("audit")), ..self }
    }

    /// A further name of this measurement, e.g. for a reply queue.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    pub fn jobs_queue(&self) -> &str {
        &self.amqp.jobs_queue
    }

    /// The worker's environment overrides that point it at these queues.
    pub fn worker_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("BATCHSCORE__AMQP__JOBS_QUEUE", self.amqp.jobs_queue.clone()),
            ("BATCHSCORE__AMQP__RESULTS_QUEUE", self.amqp.results_queue.clone()),
            ("BATCHSCORE__AMQP__DEAD_LETTER_EXCHANGE", self.amqp.dead_letter_exchange.clone()),
            ("BATCHSCORE__AMQP__DEAD_LETTER_QUEUE", self.amqp.dead_letter_queue.clone()),
        ];
        if let Some(bulk) = &self.bulk_queue {
            env.push(("BATCHSCORE__AMQP__BULK_QUEUE", bulk.clone()));
        }
        env
    }
}

/// Two connections: one publishing jobs and managing queues, one receiving results, so that
/// neither direction waits on the other.
pub struct Broker {
    publishing: Connection,
    receiving: Connection,
}

impl Broker {
    pub async fn connect(url: &str) -> Result<Self> {
        let connect = |name: &str| {
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            Connection::connect(url, properties)
        };
        let publishing = connect("batchscore-bench-publisher")
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", batchscore::amqp::redact(url)))?;
        let receiving = connect("batchscore-bench-replies").await.context("opening the results connection")?;
        Ok(Self { publishing, receiving })
    }

    /// Declares the jobs queue, dead-letter exchange and queue and results queue exactly as the
    /// worker does, so that jobs can wait in the queue before any worker runs.
    pub async fn declare(&self, topology: &Topology) -> Result<()> {
        let channel = self.publishing.create_channel().await.context("opening a channel")?;
        let amqp = AmqpSettings { declare_queues: true, ..topology.amqp.clone() };
        batchscore::amqp::declare_topology(&channel, &amqp).await.context("declaring the jobs queue")?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Removes a measurement's queues, stream and exchange; what is already gone is ignored. A
    /// channel per operation, as a refused one closes its channel.
    pub async fn delete(&self, topology: &Topology) {
        let amqp = &topology.amqp;
        let queues = [&amqp.jobs_queue, &amqp.results_queue, &amqp.dead_letter_queue];
        for queue in queues.into_iter().chain(&topology.bulk_queue).chain(&topology.audit_stream) {
            if let Ok(channel) = self.publishing.create_channel().await {
                let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                let _ = channel.close(200, "deleted".into()).await;
            }
        }
        if let Ok(channel) = self.publishing.create_channel().await {
            let _ = channel.exchange_delete(amqp.dead_letter_exchange.as_str().into(), Default::default()).await;
            let _ = channel.close(200, "deleted".into()).await;
        }
    }

    /// The audit records in `stream`: the lines of its messages of records, read from the first
    /// to an end marker this publishes, each read waiting at most `patience`. The stream's own
    /// message count would not do: a message holds a confirm round's records, and the count lags
    /// the broker's writes by seconds.
    pub async fn count_records(&self, stream: &str, patience: Duration) -> Result<usize> {
        let channel = self.publishing.create_channel().await.context("opening a channel")?;
        channel.confirm_select(Default::default()).await.context("enabling publisher confirms")?;
        let end = uuid::Uuid::new_v4().to_string();
        let marker = BasicProperties::default().with_type("bench.end".into()).with_message_id(end.as_str().into());
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = channel.basic_publish("".into(), stream.into(), options, b"", marker).await?;
        ensure!(
            matches!(tokio::time::timeout(patience, confirm).await, Ok(Ok(lapin::Confirmation::Ack(None)))),
            "the stream {stream} did not store the end marker"
        );
        // A stream is read with a prefetch, manual acknowledgements and an offset.
        channel.basic_qos(1_000, Default::default()).await.context("setting the prefetch")?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), lapin::types::AMQPValue::LongString("first".into()));
        let mut deliveries = channel
            .basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), arguments)
            .await
            .with_context(|| format!("reading the stream {stream}"))?;
        let mut records = 0;
        loop {
            let delivery = tokio::time::timeout(patience, deliveries.next())
                .await
                .with_context(|| format!("the end of {stream} not reached after {records} records"))?
                .with_context(|| format!("the stream {stream} ended"))??;
            delivery.acker.ack(Default::default()).await?;
            if delivery.properties.message_id().as_ref().is_some_and(|id| id.as_str() == end) {
                let _ = channel.close(200, "counted".into()).await;
                return Ok(records);
            }
            records += memchr::memchr_iter(b'\n', &delivery.data).count();
        }
    }

    /// A confirm channel for publishing jobs.
    pub async fn publisher(&self) -> Result<Publisher> {
        let channel = self.publishing.create_channel().await.context("opening the publishing channel")?;
        channel.confirm_select(Default::default()).await.context("enabling publisher confirms")?;
        Ok(Publisher { channel })
    }

    /// An exclusive reply queue named `name`, consumed without acknowledgements.
    pub async fn replies(&self, name: &str) -> Result<Replies> {
        let channel = self.receiving.create_channel().await.context("opening the results channel")?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(name.into(), options, FieldTable::default()).await.context("declaring a reply queue")?;
        let consumer = channel
            .basic_consume(
                name.into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("consuming the reply queue")?;
        Ok(Replies { name: name.to_string(), channel, consumer: Some(consumer) })
    }

    pub async fn close(&self) {
        let _ = self.publishing.close(200, "benchmark done".into()).await;
        let _ = self.receiving.close(200, "benchmark done".into()).await;
    }
}

pub struct Publisher {
    channel: Channel,
}

/// When each job of an open loop was published, and how late the schedule ran.
pub struct Schedule {
    pub published_at: Vec<Instant>,
    pub max_lag: Duration,
}

impl Publisher {
    /// Publishes every job as fast as the broker takes them: many publishes in flight, their
    /// confirms awaited a window behind. Returns the time it took until the last confirm.
    pub async fn prefill(&self, queue: &str, reply_to: &str, jobs: &[Job]) -> Result<Duration> {
        let started = Instant::now();
        let body_len = jobs.first().map_or(1, |j| j.body.len().max(1));
        let in_flight = (PIPELINE_BYTES / body_len).clamp(1, 512);
        let mut publishes =
            futures_util::stream::iter(jobs).map(|job| self.publish(queue, reply_to, job)).buffered(in_flight);
        let mut confirms = VecDeque::with_capacity(2 * CONFIRM_WINDOW);
        while let Some(confirm) = publishes.next().await {
            confirms.push_back(confirm?);
            if confirms.len() >= 2 * CONFIRM_WINDOW {
                settle(confirms.drain(..CONFIRM_WINDOW)).await?;
            }
        }
        settle(confirms.drain(..)).await?;
        Ok(started.elapsed())
    }

    /// Publishes job `i` at `start + i / rate`, by the clock rather than after the previous
    /// publish, so a late publish does not shift the ones after it.
    pub async fn on_schedule(&self, queue: &str, reply_to: &str, jobs: &[Job], rate: f64) -> Result<Schedule> {
        let start = Instant::now();
        let mut published_at = Vec::with_capacity(jobs.len());
        let mut confirms = Vec::with_capacity(jobs.len());
        let mut max_lag = Duration::ZERO;
        for (i, job) in jobs.iter().enumerate() {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let now = Instant::now();
            max_lag = max_lag.max(now - due);
            published_at.push(now);
            confirms.push(self.publish(queue, reply_to, job).await?);
        }
        settle(confirms).await?;
        Ok(Schedule { published_at, max_lag })
    }

    async fn publish(&self, queue: &str, reply_to: &str, job: &Job) -> Result<PublisherConfirm> {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(reply_to.into())
            .with_correlation_id(job.id.as_str().into());
        if let Some(headers) = &job.headers {
            properties = properties.with_headers(headers.clone());
        }
        self.channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &job.body, properties)
            .await
            .with_context(|| format!("publishing job {} to {queue}", job.id))
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "published".into()).await;
    }
}

async fn settle(confirms: impl IntoIterator<Item = PublisherConfirm>) -> Result<()> {
    for confirm in confirms {
        let confirmation = confirm.await.context("waiting for the broker to confirm a job")?;
        ensure!(confirmation.is_ack(), "the broker refused a job (negative confirm)");
    }
    Ok(())
}

/// What a measurement expects back on its reply queue.
pub struct Expectation {
    pub label: String,
    pub jobs: usize,
    pub rows_per_job: usize,
    /// Scores to compare a few results with; `None` for the no-op engine.
    pub reference: Option<Arc<Reference>>,
    /// The key results come sealed with, for jobs sent sealed; `None` for plaintext results.
    pub key: Option<PayloadKey>,
    pub deadline: Instant,
}

/// The first result of every job, as received.
pub struct Collected {
    /// Receipt time per job index.
    pub received_at: Vec<Option<Instant>>,
    /// Per job index, the time the worker says it held the job (`timing_ms.total`), when given.
    pub worker_ms: Vec<Option<f64>>,
    pub last: Instant,
    /// Further results for jobs already answered (redeliveries).
    pub duplicates: usize,
    pub spot_checked: usize,
}

pub struct Replies {
    pub name: String,
    channel: Channel,
    consumer: Option<lapin::Consumer>,
}

impl Replies {
    /// Starts receiving in the background, stamping each result as it arrives.
    pub fn collect(&mut self, expectation: Expectation) -> Result<Collector> {
        let consumer = self.consumer.take().context("the reply queue is already being collected")?;
        Ok(Collector::spawn(collect(consumer, expectation)))
    }

    pub async fn close(self) {
        let _ = self.channel.queue_delete(self.name.as_str().into(), QueueDeleteOptions::default()).await;
        let _ = self.channel.close(200, "collected".into()).await;
    }
}

/// A running collection of results into a `T`; dropping it stops the collection.
pub struct Collector<T = Collected>(JoinHandle<Result<T>>);

impl<T: Send + 'static> Collector<T> {
    /// Runs `collection` in the background.
    pub fn spawn(collection: impl std::future::Future<Output = Result<T>> + Send + 'static) -> Self {
        Self(tokio::spawn(collection))
    }

    pub async fn finish(mut self) -> Result<T> {
        (&mut self.0).await.context("the result collector panicked")?
    }
}

impl<T> Drop for Collector<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The fields of a result the benchmark checks.
#[derive(Deserialize)]
struct ResultBody {
    job_id: Option<String>,
    status: String,
    rows: Option<usize>,
    outputs: Option<Outputs>,
    error: Option<serde_json::Value>,
    timing_ms: Option<TimingBody>,
}

#[derive(Deserialize)]
struct TimingBody {
    total: f64,
}

#[derive(Deserialize)]
struct Outputs {
    probabilities: Option<Vec<Vec<Option<f64>>>>,
}

async fn collect(mut consumer: lapin::Consumer, expect: Expectation) -> Result<Collected> {
    let Expectation { label, jobs, deadline, .. } = &expect;
    let mut received_at = vec![None; *jobs];
    let mut worker_ms = vec![None; *jobs];
    let (mut answered, mut duplicates, mut last) = (0, 0, Instant::now());
    let mut checks = Checks::default();
    while answered < *jobs {
        let next = tokio::time::timeout_at((*deadline).into(), consumer.next()).await;
        let delivery = match next {
            Err(_) => bail!("{label}: only {answered} of {jobs} jobs were answered in time"),
            Ok(None) => bail!("{label}: the reply queue closed after {answered} of {jobs} results"),
            Ok(Some(delivery)) => delivery.with_context(|| format!("{label}: receiving results"))?,
        };
        let now = Instant::now();
        let (index, held_ms) = checks.check(&expect, &delivery)?;
        match &mut received_at[index] {
            Some(_) => duplicates += 1,
            slot => {
                *slot = Some(now);
                worker_ms[index] = held_ms;
                answered += 1;
                last = now;
            }
        }
    }
    checks.verdict(label, *jobs)?;
    Ok(Collected { received_at, worker_ms, last, duplicates, spot_checked: checks.spot_checked })
}

/// The plaintext of a result sealed with `key`: it must say so in its headers, and open.
fn open(key: &PayloadKey, delivery: &lapin::message::Delivery) -> Result<Vec<u8>> {
    let sealing = batchscore::amqp::sealing(&delivery.properties).context("came in plaintext, not sealed")?;
    ensure!(
        sealing.scheme == Some(batchscore::payload::SCHEME) && sealing.key_id == Some(key.id()),
        "is marked {:?} with key {:?}, not {} with {}",
        sealing.scheme,
        sealing.key_id,
        batchscore::payload::SCHEME,
        key.id()
    );
    key.open(&delivery.data).context("does not open with the key its job was sealed with")
}

/// Problems found in results: counted, the first few kept for the message.
#[derive(Default)]
struct Checks {
    wrong: usize,
    examples: Vec<String>,
    spot_checked: usize,
}

impl Checks {
    /// Checks one result and returns its job index and the worker's `timing_ms.total`; a result
    /// for no job of this measurement is an error at once.
    fn check(&mut self, expect: &Expectation, delivery: &lapin::message::Delivery) -> Result<(usize, Option<f64>)> {
        let opened;
        let data = match &expect.key {
            None => &delivery.data,
            Some(key) => {
                opened = open(key, delivery).with_context(|| format!("{}: a result", expect.label))?;
                &opened
            }
        };
        let excerpt = || String::from_utf8_lossy(&data[..data.len().min(300)]).into_owned();
        let body: ResultBody = serde_json::from_slice(data)
            .with_context(|| format!("{}: a result is not the expected JSON: {}", expect.label, excerpt()))?;
        let id = body.job_id.as_deref().unwrap_or_default();
        let index = jobs::job_index(id)
            .filter(|i| *i < expect.jobs)
            .with_context(|| format!("{}: a result for an unknown job: {}", expect.label, excerpt()))?;
        let correlation = delivery.properties.correlation_id().as_ref().map(|c| c.as_str());
        if correlation != Some(id) {
            self.problem(format!("{id}: correlation_id {correlation:?} is not the job id"));
        }
        if body.status != "ok" {
            let error = body.error.map(|e| e.to_string()).unwrap_or_default();
            self.problem(format!("{id}: status {} {error}", body.status));
            return Ok((index, None));
        }
        if body.rows != Some(expect.rows_per_job) {
            self.problem(format!("{id}: rows {:?}, expected {}", body.rows, expect.rows_per_job));
        }
        let held_ms = body.timing_ms.as_ref().map(|t| t.total);
        let probabilities = body.outputs.and_then(|o| o.probabilities).unwrap_or_default();
        if probabilities.len() != expect.rows_per_job {
            self.problem(format!("{id}: {} probabilities for {} rows", probabilities.len(), expect.rows_per_job));
        } else if let Some(reference) = expect.reference.as_deref().filter(|_| self.spot_checked < SPOT_JOBS) {
            self.spot_checked += 1;
            self.spot_check(id, index, expect.rows_per_job, &probabilities, reference);
        }
        Ok((index, held_ms))
    }

    fn spot_check(
        &mut self,
        id: &str,
        job: usize,
        rows: usize,
        probabilities: &[Vec<Option<f64>>],
        reference: &Reference,
    ) {
        for (row, scores) in probabilities.iter().enumerate().take(SPOT_ROWS) {
            let expected = f64::from(reference.p_default(jobs::sample_index(reference.len(), job, rows, row)));
            match scores.get(1).copied().flatten() {
                Some(got) if (got - expected).abs() <= SPOT_TOLERANCE => {}
                got => self.problem(format!("{id} row {row}: probability of default {got:?}, in-process {expected}")),
            }
        }
    }

    fn problem(&mut self, text: String) {
        self.wrong += 1;
        if self.examples.len() < 3 {
            self.examples.push(text);
        }
    }

    fn verdict(&self, label: &str, jobs: usize) -> Result<()> {
        if self.wrong > 0 {
            bail!("{label}: {} problems in {jobs} results, e.g. {}", self.wrong, self.examples.join("; "));
        }
        Ok(())
    }
}

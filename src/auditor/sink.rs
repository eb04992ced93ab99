//! `batchscore audit sink`: tails the audit stream into PostgreSQL. It resumes at the offset the
//! database holds for the stream, stores the records of up to [`BATCH_RECORDS`] records (or
//! [`BATCH_WAIT`] worth of messages) in one transaction together with the next offset, and only
//! then acknowledges the messages to the broker; on Ctrl-C or SIGTERM it stores what it has read
//! and stops. One sink per stream stores at a time (a PostgreSQL advisory lock); another waits.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::database::{Database, DatabaseError, Message};
use crate::amqp::tail::{Receipt, StreamMessage, Tail, TailError};
use crate::settings::{Settings, SettingsError};

/// Most records stored in one transaction.
pub const BATCH_RECORDS: usize = 500;

/// Longest a read message waits for more to share its transaction.
pub const BATCH_WAIT: Duration = Duration::from_millis(200);

/// Messages read ahead of their acknowledgement: enough to fill a batch of one-record messages
/// while the previous one is being stored.
const PREFETCH: u16 = 2 * BATCH_RECORDS as u16;

/// How often a waiting sink tries the stream's lock again.
const LOCK_RETRY: Duration = Duration::from_secs(5);

/// How often progress is logged while records flow.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// `batchscore audit sink`'s options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SinkArgs {
    /// PostgreSQL URL, postgres://USER@HOST:PORT/DATABASE; overrides audit.database. The password
    /// comes from audit.database_password_file, the URL or PGPASSWORD.
    #[arg(long)]
    pub database: Option<String>,
    /// The audit stream to read; overrides audit.stream.
    #[arg(long)]
    pub stream: Option<String>,
    /// Apply the database migrations and stop (run once as the database's owner when the sink
    /// itself logs in as batchscore_audit_sink, which may not change the schema).
    #[arg(long)]
    pub migrate_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Stream(#[from] TailError),
}

impl SinkError {
    /// Whether a person must change something before the sink can work.
    pub fn is_setup(&self) -> bool {
        match self {
            SinkError::Settings(_) => true,
            SinkError::Database(error) => error.is_setup(),
            SinkError::Stream(TailError::Connect(error)) => error.is_refusal(),
            SinkError::Stream(_) => false,
        }
    }
}

/// What a sink run stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    pub records: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// The offset it stopped before: where the next run starts.
    pub next_offset: u64,
}

/// Runs the sink until `shutdown` is cancelled (or a failure).
pub async fn run(settings: &Settings, args: &SinkArgs, shutdown: CancellationToken) -> Result<Totals, SinkError> {
    let url = settings.audit.database_url(args.database.as_deref())?;
    let stream = args.stream.clone().unwrap_or_else(|| settings.audit.stream.clone());
    let mut database = Database::connect(&url).await?;
    let applied = database.migrate().await?;
    if args.migrate_only {
        tracing::info!(url = database.url(), applied = applied.len(), "the audit database is up to date");
        return Ok(Totals::default());
    }
    while !database.try_lock_stream(&stream).await? {
        tracing::warn!(stream, url = database.url(), "another sink is storing this stream; waiting for it to stop");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(Totals::default()),
            () = tokio::time::sleep(LOCK_RETRY) => {}
        }
    }
    let start = database.stored_offset(&stream).await?.unwrap_or(0);
    let mut tail = tokio::select! {
        () = shutdown.cancelled() => return Ok(Totals { next_offset: start, ..Totals::default() }),
        opened = Tail::open(&settings.amqp, &stream, start, PREFETCH) => opened?,
    };
    tracing::info!(stream, offset = start, url = database.url(), "storing the audit stream");
    let outcome = pump(&mut database, &mut tail, &stream, start, &shutdown).await;
    tail.close().await;
    let totals = outcome?;
    tracing::info!(
        stream,
        records = totals.records,
        duplicates = totals.duplicates,
        rejected = totals.rejected,
        next_offset = totals.next_offset,
        "the sink stopped"
    );
    Ok(totals)
}

/// Reads, stores and acknowledges batches until shutdown; the batch in hand is stored first.
async fn pump(
    database: &mut Database,
    tail: &mut Tail,
    stream: &str,
    start: u64,
    shutdown: &CancellationToken,
) -> Result<Totals, SinkError> {
    let mut totals = Totals { next_offset: start, ..Totals::default() };
    let mut last_report = Instant::now();
    loop {
        let (batch, stopping) = read_batch(tail, shutdown).await?;
        if let Some(last) = batch.last() {
            let next_offset = last.offset + 1;
            let messages: Vec<Message<'_>> = batch
                .iter()
                .filter(|message| message.audit)
                .map(|message| Message { offset: message.offset, body: &message.body })
                .collect();
            let stored = database.store(stream, &messages, next_offset).await?;
            // Only now may the broker forget them: they are committed with the offset.
            let receipt: Receipt = last.receipt();
            tail.acknowledge(&receipt).await?;
            for rejection in &stored.rejected {
                tracing::error!(
                    stream,
                    offset = rejection.offset,
                    line = rejection.line_no,
                    problem = %rejection.problem,
                    "a line of the audit stream is not a storable record; kept in audit_rejected_line"
                );
            }
            totals.records += stored.records;
            totals.duplicates += stored.duplicates;
            totals.rejected += stored.rejected.len() as u64;
            totals.next_offset = next_offset;
            tracing::debug!(stream, records = stored.records, next_offset, "stored a batch");
            if last_report.elapsed() >= PROGRESS_EVERY {
                tracing::info!(stream, records = totals.records, next_offset, "storing the audit stream");
                last_report = Instant::now();
            }
        }
        if stopping {
            return Ok(totals);
        }
    }
}

/// Messages read for one transaction: up to [`BATCH_RECORDS`] records, or what came within
/// [`BATCH_WAIT`] of the first; `true` when shutdown was asked for meanwhile.
async fn read_batch(tail: &mut Tail, shutdown: &CancellationToken) -> Result<(Vec<StreamMessage>, bool), TailError> {
    let mut batch = Vec::new();
    let first = tokio::select! {
        () = shutdown.cancelled() => return Ok((batch, true)),
        message = tail.next() => message?,
    };
    let mut records = count_records(&first);
    batch.push(first);
    let deadline = tokio::time::Instant::now() + BATCH_WAIT;
    while records < BATCH_RECORDS {
        tokio::select! {
            () = shutdown.cancelled() => return Ok((batch, true)),
            () = tokio::time::sleep_until(deadline) => break,
            message = tail.next() => {
                let message = message?;
                records += count_records(&message);
                batch.push(message);
            }
        }
    }
    Ok((batch, false))
}

/// The records a message holds: its lines, for an audit message.
fn count_records(message: &StreamMessage) -> usize {
    if !message.audit {
        return 0;
    }
    let breaks = message.body.iter().filter(|&&byte| byte == b'\n').count();
    // A last line without its line break is a record too.
    breaks + usize::from(message.body.last().is_some_and(|&byte| byte != b'\n'))
}

//! The audit trail's reading side, `batchscore audit`: finding the records of a job, a time,
//! a model or a publisher ([`find`]), verifying that every chain of records is whole
//! ([`verify`]), and scoring a recorded job again ([`reproduce`]). Finding and verifying take
//! records one by one from a [`source::RecordSource`] (the audit stream on the broker,
//! [`source::StreamSource`]), so another store of the same records can feed them. [`tail`] finds
//! a worker's last record for the worker's first chain to name. The PostgreSQL copy of the
//! stream is [`database`], which `batchscore audit sink` keeps up to date ([`sink`]). Writing
//! records is the worker's (`audit`, `amqp::recorder`); nothing here writes to the stream.

pub mod copy;
pub mod database;
pub mod error;
pub mod find;
pub mod record;
pub mod reproduce;
pub mod sink;
pub mod source;
pub mod tail;
pub mod time;
pub mod verify;

use std::io::Write;
use std::time::Duration;

pub use self::error::AuditorError;
use self::find::{Finder, Format, Query};
use self::reproduce::ReproduceArgs;
use self::source::{RecordSource, StreamSource, Window};
use self::verify::{Report, Verifier};
use crate::settings::Settings;

/// `batchscore audit ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AuditCommand {
    /// Find audit records by job, time, model, version or publisher. Exits 1 when none matched.
    Find(FindArgs),
    /// Verify every chain of audit records: gaps, reordered and altered records. Exits 1 when any
    /// chain is broken.
    VerifyChain(VerifyArgs),
    /// Score a recorded job again with the model file its record names (found in the repository
    /// or in models.archive) and compare with the record. Exits 1 when it is not reproduced.
    Reproduce(Box<ReproduceCommand>),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReproduceCommand {
    #[command(flatten)]
    pub job: ReproduceArgs,
    /// The job whose record to reproduce, looked up in the audit stream (its last record, when
    /// it was answered more than once); instead of --record.
    #[arg(long, value_name = "ID", group = "record_source")]
    pub job_id: Option<String>,
    #[command(flatten)]
    pub read: StreamArgs,
}

/// Which stream to read, and when it has ended.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// The audit stream; default: the setting audit.stream.
    #[arg(long, value_name = "STREAM")]
    pub stream: Option<String>,
    /// The end of the stream: no record arrived for this long, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub idle_ms: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct FindArgs {
    /// The job's id, as its result names it.
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Answered at or after this time: RFC 3339 (2026-03-03T14:05:00Z) or epoch milliseconds.
    #[arg(long, value_name = "TIME", value_parser = time::parse_instant)]
    pub since: Option<u64>,
    /// Answered at or before this time: RFC 3339 or epoch milliseconds.
    #[arg(long, value_name = "TIME", value_parser = time::parse_instant)]
    pub until: Option<u64>,
    /// Scored by (or asked for) this model.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// This model version.
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
    /// Published by this broker user (the record's user_id).
    #[arg(long, value_name = "USER")]
    pub publisher: Option<String>,
    /// table: aligned columns; jsonl: each record exactly as stored, one a line.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
    #[command(flatten)]
    pub read: StreamArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Verify only records from about this time on (RFC 3339 or epoch milliseconds); a chain's
    /// first record read is then its start.
    #[arg(long, value_name = "TIME", value_parser = time::parse_instant)]
    pub since: Option<u64>,
    #[command(flatten)]
    pub read: StreamArgs,
}

/// How a command ended: `clean` (something found, every chain whole) or not, and what to tell
/// the person on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub clean: bool,
    pub message: Option<String>,
}

/// Runs `command` against the audit stream of `settings`, writing its answer to `out`.
pub async fn run(settings: &Settings, command: &AuditCommand, out: &mut impl Write) -> Result<Verdict, AuditorError> {
    match command {
        AuditCommand::Find(args) => {
            let query = Query {
                job_id: args.job_id.clone(),
                since_ms: args.since,
                until_ms: args.until,
                model: args.model.clone(),
                version: args.version,
                publisher: args.publisher.clone(),
            };
            let window = window(settings, &args.read, args.since, args.until);
            let finder = Finder::new(query.clone(), args.format);
            let ((matched, unreadable), origin) = match copy::open(settings).await? {
                Some(database) => {
                    let mut source = copy::records_for(&database, &query).await?;
                    (find_in(&mut source, finder, out).await?, format!("the audit database {}", database.url()))
                }
                None => {
                    let mut source = StreamSource::open(&settings.amqp, &window).await?;
                    (find_in(&mut source, finder, out).await?, window.stream.clone())
                }
            };
            let mut notes = Vec::new();
            if unreadable > 0 {
                notes.push(format!("{unreadable} records of {origin} are not JSON objects and were skipped"));
            }
            if matched == 0 {
                notes.push(format!("no record in {origin} matched"));
            }
            Ok(Verdict { clean: matched > 0, message: (!notes.is_empty()).then(|| notes.join("; ")) })
        }
        AuditCommand::VerifyChain(args) => {
            let window = window(settings, &args.read, args.since, None);
            let (report, origin) = match copy::open(settings).await? {
                Some(database) => {
                    let mut source = copy::chains_since(&database, args.since).await?;
                    // The database holds each chain whole, from its first record.
                    (verify_in(&mut source, false).await?, format!("the audit database {}", database.url()))
                }
                None => {
                    let mut source = StreamSource::open(&settings.amqp, &window).await?;
                    (verify_in(&mut source, args.since.is_some()).await?, window.stream.clone())
                }
            };
            write!(out, "{report}")?;
            let message =
                (!report.is_whole()).then(|| format!("{} problems in the chains of {origin}", report.problems()));
            Ok(Verdict { clean: report.is_whole(), message })
        }
        AuditCommand::Reproduce(command) => {
            let report = match &command.job_id {
                Some(job_id) => {
                    let window = window(settings, &command.read, None, None);
                    let (record, origin) = last_record_of(settings, &window, job_id).await?;
                    reproduce::run_recorded(settings, &record, &origin, &command.job.input).await?
                }
                None => reproduce::run(settings, &command.job).await?,
            };
            writeln!(out, "{report}")?;
            let reproduced = report.comparison.reproduced();
            let message = (!reproduced).then(|| reproduce::ReproduceError::Differs.to_string());
            Ok(Verdict { clean: reproduced, message })
        }
    }
}

/// The last record of job `job_id` in the stream, and where it came from.
async fn last_record_of(settings: &Settings, window: &Window, job_id: &str) -> Result<(Vec<u8>, String), AuditorError> {
    let mut source = StreamSource::open(&settings.amqp, window).await?;
    let finder = Finder::new(Query { job_id: Some(job_id.to_string()), ..Query::default() }, Format::Jsonl);
    let mut found = Vec::new();
    find_in(&mut source, finder, &mut found).await?;
    // JSON Lines of every record of the job, in stream order: the last answer is the last line.
    let last = found.split(|byte| *byte == b'\n').rfind(|line| !line.is_empty());
    match last {
        Some(record) => Ok((record.to_vec(), format!("the last record of job {job_id:?} in {}", window.stream))),
        None => Err(AuditorError::NoRecordOfJob { job_id: job_id.to_string(), stream: window.stream.clone() }),
    }
}

fn window(settings: &Settings, read: &StreamArgs, since_ms: Option<u64>, until_ms: Option<u64>) -> Window {
    Window {
        stream: read.stream.clone().unwrap_or_else(|| settings.audit.stream.clone()),
        since_ms,
        until_ms,
        idle: Duration::from_millis(read.idle_ms.max(1)),
    }
}

/// Feeds every record of `source` to `finder`; the matches go to `out`. Returns the number of
/// matches and of records that could not be read.
pub async fn find_in(
    source: &mut impl RecordSource,
    mut finder: Finder,
    out: &mut impl Write,
) -> Result<(u64, u64), AuditorError> {
    while let Some(record) = source.next_record().await? {
        finder.push(&record, out)?;
    }
    Ok(finder.finish(out)?)
}

/// Verifies the chains of every record of `source`; `window_cut`: the source does not start at
/// the trail's beginning.
pub async fn verify_in(source: &mut impl RecordSource, window_cut: bool) -> Result<Report, AuditorError> {
    let mut verifier = Verifier::new(window_cut);
    while let Some(record) = source.next_record().await? {
        verifier.push(record.offset, &record.bytes);
    }
    Ok(verifier.finish())
}

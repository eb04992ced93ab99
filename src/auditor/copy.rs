//! The PostgreSQL copy of the trail as a source of records for `audit find` and
//! `audit verify-chain`, used when `audit.database` is set: a job's records come by the job id
//! index, a time window's as the whole chains it touches, each chain in `seq` order.

use super::database::{Database, Filters};
use super::error::AuditorError;
use super::find::Query;
use super::record::StoredRecord;
use super::source::InMemory;
use crate::settings::Settings;

/// The end of an open time window: 10000-01-01, where PostgreSQL's timestamps still reach.
const OPEN_END_MS: i64 = 253_402_300_800_000;

/// The database copy of the trail, when `audit.database` is set.
pub async fn open(settings: &Settings) -> Result<Option<Database>, AuditorError> {
    if settings.audit.database.is_empty() {
        return Ok(None);
    }
    let url = settings.audit.database_url(None)?;
    Ok(Some(Database::connect(&url).await?))
}

/// The stored records `query` may match: by its job id when it names one, else every chain
/// with a record in its time window (and of its model and version).
pub async fn records_for(database: &Database, query: &Query) -> Result<InMemory, AuditorError> {
    if let Some(job_id) = &query.job_id {
        let bodies = database.find_by_job_id(job_id).await?;
        return Ok(InMemory::new(bodies.into_iter().map(|body| StoredRecord { offset: 0, bytes: body.into_bytes() })));
    }
    let filters = Filters {
        model: query.model.clone(),
        version: query.version.and_then(|v| i64::try_from(v).ok()),
        ..Filters::default()
    };
    chains(database, query.since_ms, query.until_ms, &filters).await
}

/// Every stored chain with a record answered from `since_ms` on, for verification.
pub async fn chains_since(database: &Database, since_ms: Option<u64>) -> Result<InMemory, AuditorError> {
    chains(database, since_ms, None, &Filters::default()).await
}

async fn chains(
    database: &Database,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    filters: &Filters,
) -> Result<InMemory, AuditorError> {
    let millis = |ms: u64| i64::try_from(ms).unwrap_or(OPEN_END_MS).min(OPEN_END_MS);
    // The database's window ends before `until`; a find's ends at it.
    let until = until_ms.map_or(OPEN_END_MS, |ms| millis(ms).saturating_add(1).min(OPEN_END_MS));
    let stored = database.records_since(since_ms.map_or(0, millis), until, filters).await?;
    Ok(InMemory::new(stored.into_iter().map(|record| StoredRecord {
        offset: u64::try_from(record.stream_offset).unwrap_or_default(),
        bytes: record.body.into_bytes(),
    })))
}

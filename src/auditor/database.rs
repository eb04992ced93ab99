//! The audit trail's PostgreSQL copy: the connection (the URL shown without its password), the
//! migrations of `deploy/postgres/migrations/` (applied in order, each once, in a transaction),
//! storing the records of stream messages together with the stream offset to resume from, and
//! the queries auditors ask (a job's records, the chains of a time window). A stream line that is
//! not a record is kept in `audit_rejected_line` with the reason. docs/AUDIT.md describes the
//! tables and roles.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

use super::record;

/// One migration: its name (the file's stem) and its SQL.
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

/// The migrations, in the order they apply; each file of `deploy/postgres/migrations/` is here
/// (a unit test checks it), so the binary carries its own schema.
pub const MIGRATIONS: &[Migration] =
    &[Migration { name: "0001_audit", sql: include_str!("../../deploy/postgres/migrations/0001_audit.sql") }];

/// Longest a connection attempt waits for the server, unless the URL says `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Keys of the advisory lock one sink per stream holds: the first names the sink, the second is
/// the stream's `hashtext`.
const LOCK_CLASS: i32 = 0x6261_7564; // "baud": batchscore audit

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(
        "no audit database: set audit.database (BATCHSCORE__AUDIT__DATABASE) or pass --database, e.g. \
         postgres://batchscore_audit_sink@db.example:5432/audit"
    )]
    NoUrl,
    #[error("the audit database URL {url} cannot be used: {problem}")]
    Url { url: String, problem: String },
    #[error(
        "cannot connect to PostgreSQL at {url}: {}; check that the server runs there and that the user, \
         password (audit.database_password_file or PGPASSWORD) and database of audit.database (or --database) are \
         right",
        cause(source)
    )]
    Connect { url: String, source: tokio_postgres::Error },
    #[error(
        "migration {name} is not applied in {url}, and its user may not apply it: {}. Apply the migrations \
         once as the database's owner (batchscore audit sink --migrate-only --database \
         postgres://OWNER@HOST/DB), then start the sink as batchscore_audit_sink",
        cause(source)
    )]
    MigrationRefused { name: &'static str, url: String, source: tokio_postgres::Error },
    #[error("migration {name} failed in {url}: {}; nothing of it was applied", cause(source))]
    Migration { name: &'static str, url: String, source: tokio_postgres::Error },
    #[error(
        "{url} has no audit tables yet and its user may not create them: {}. Apply the migrations once as the \
         database's owner (batchscore audit sink --migrate-only --database postgres://OWNER@HOST/DB)",
        cause(source)
    )]
    NotMigrated { url: String, source: tokio_postgres::Error },
    #[error("{what} in {url} failed: {}", cause(source))]
    Query { what: &'static str, url: String, source: tokio_postgres::Error },
    #[error("the stored offset of the stream {stream} is {offset}, which is not an offset; correct audit_sink_offset")]
    BadOffset { stream: String, offset: i64 },
}

impl DatabaseError {
    /// Whether a person must change something before the sink can work (the URL, the
    /// credentials, the rights), as opposed to a failure worth retrying.
    pub fn is_setup(&self) -> bool {
        match self {
            DatabaseError::NoUrl
            | DatabaseError::Url { .. }
            | DatabaseError::MigrationRefused { .. }
            | DatabaseError::NotMigrated { .. }
            | DatabaseError::BadOffset { .. } => true,
            DatabaseError::Connect { source, .. } => source.as_db_error().is_some(),
            DatabaseError::Migration { .. } | DatabaseError::Query { .. } => false,
        }
    }
}

/// A connection to the audit database.
pub struct Database {
    client: Client,
    /// The URL as it may be shown: no password.
    url: String,
    connection: tokio::task::JoinHandle<()>,
}

/// One message of the stream with its audit records, one per line (JSON Lines).
pub struct Message<'a> {
    pub offset: u64,
    pub body: &'a [u8],
}

/// What one [`Database::store`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Records added.
    pub records: u64,
    /// Records already there with the same bytes (read again after a restart).
    pub duplicates: u64,
    /// Lines kept in `audit_rejected_line` instead, with why.
    pub rejected: Vec<Rejection>,
}

/// A line that is not stored as a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub offset: u64,
    /// The line's place in its message, from 0.
    pub line_no: u32,
    pub problem: String,
}

/// Which chains [`Database::records_since`] returns, besides the time window.
#[derive(Debug, Default, Clone)]
pub struct Filters {
    pub worker_id: Option<String>,
    pub chain_id: Option<String>,
    pub model: Option<String>,
    pub version: Option<i64>,
}

/// A stored record with its key, as verification reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub worker_id: String,
    pub chain_id: String,
    pub seq: i64,
    pub stream_offset: i64,
    /// The record's exact bytes.
    pub body: String,
}

impl Database {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=disable]`); without
    /// a password in the URL, the environment's `PGPASSWORD` is used.
    pub async fn connect(url: &str) -> Result<Self, DatabaseError> {
        if url.is_empty() {
            return Err(DatabaseError::NoUrl);
        }
        let mut config: Config = url.parse().map_err(|error: tokio_postgres::Error| DatabaseError::Url {
            url: crate::settings::redact(url),
            problem: format!(
                "{error}; write it as postgres://USER@HOST:PORT/DATABASE (the password from \
                 audit.database_password_file or PGPASSWORD)"
            ),
        })?;
        let shown = shown(&config);
        if config.get_password().is_none() {
            if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // The one place TLS would come in: a TLS connector for sslmode=require (and
        // verify-ca/verify-full) instead of NoTls. `prefer`, the default, falls back to
        // plaintext with NoTls, as libpq does without TLS support.
        let connecting = match config.get_ssl_mode() {
            SslMode::Disable | SslMode::Prefer => config.connect(NoTls),
            _ => {
                return Err(DatabaseError::Url {
                    url: shown,
                    problem: "sslmode asks for TLS, which this build does not include; connect through a \
                              protected network (a local socket, a sidecar proxy, a service mesh) with \
                              sslmode=disable or prefer"
                        .into(),
                })
            }
        };
        let (client, connection) =
            connecting.await.map_err(|source| DatabaseError::Connect { url: shown.clone(), source })?;
        let logged = shown.clone();
        let connection = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::error!(url = %logged, %error, "the connection to the audit database failed");
            }
        });
        Ok(Self { client, url: shown, connection })
    }

    /// The URL without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn query_error(&self, what: &'static str) -> impl Fn(tokio_postgres::Error) -> DatabaseError + '_ {
        move |source| DatabaseError::Query { what, url: self.url.clone(), source }
    }

    /// Applies the migrations not applied yet, in order, each in a transaction of its own and
    /// recorded in `audit_migrations`; returns the names applied. With every migration applied,
    /// it only reads `audit_migrations`, so a sink without the right to change the schema starts.
    pub async fn migrate(&mut self) -> Result<Vec<&'static str>, DatabaseError> {
        let exists = self
            .client
            .query_one("SELECT to_regclass('audit_migrations') IS NOT NULL", &[])
            .await
            .map_err(self.query_error("looking for audit_migrations"))?;
        if !exists.get::<_, bool>(0) {
            let created = self
                .client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS audit_migrations (\
                         name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await;
            match created {
                Ok(()) => {}
                Err(source) if is_permission(&source) => {
                    return Err(DatabaseError::NotMigrated { url: self.url.clone(), source })
                }
                // Another sink created it at the same moment: the race loses harmlessly.
                Err(source) if source.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
                Err(source) => return Err(self.query_error("creating audit_migrations")(source)),
            }
        }
        let mut applied = Vec::new();
        for migration in MIGRATIONS {
            if self.is_applied(migration.name).await? {
                continue;
            }
            let url = self.url.clone();
            let failed = |source: tokio_postgres::Error| {
                if is_permission(&source) {
                    DatabaseError::MigrationRefused { name: migration.name, url: url.clone(), source }
                } else {
                    DatabaseError::Migration { name: migration.name, url: url.clone(), source }
                }
            };
            let transaction = self.client.transaction().await.map_err(&failed)?;
            // Two sinks starting together: the second waits here, then finds it applied.
            transaction.batch_execute("LOCK TABLE audit_migrations IN EXCLUSIVE MODE").await.map_err(&failed)?;
            let done = transaction
                .query_opt("SELECT 1 FROM audit_migrations WHERE name = $1", &[&migration.name])
                .await
                .map_err(&failed)?;
            if done.is_some() {
                continue;
            }
            transaction.batch_execute(migration.sql).await.map_err(&failed)?;
            transaction
                .execute("INSERT INTO audit_migrations (name) VALUES ($1)", &[&migration.name])
                .await
                .map_err(&failed)?;
            transaction.commit().await.map_err(&failed)?;
            tracing::info!(migration = migration.name, url = %self.url, "applied a migration of the audit database");
            applied.push(migration.name);
        }
        Ok(applied)
    }

    async fn is_applied(&self, name: &str) -> Result<bool, DatabaseError> {
        let row = self.client.query_opt("SELECT 1 FROM audit_migrations WHERE name = $1", &[&name]).await.map_err(
            |source| {
                if is_permission(&source) {
                    DatabaseError::NotMigrated { url: self.url.clone(), source }
                } else {
                    self.query_error("reading audit_migrations")(source)
                }
            },
        )?;
        Ok(row.is_some())
    }

    /// Takes the lock that lets one sink at a time store a stream's records, if it is free;
    /// held until the connection ends.
    pub async fn try_lock_stream(&self, stream: &str) -> Result<bool, DatabaseError> {
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LOCK_CLASS, &stream])
            .await
            .map_err(self.query_error("locking the stream"))?;
        Ok(row.get(0))
    }

    /// The offset of the first message of `stream` not stored yet; `None` before the first.
    pub async fn stored_offset(&self, stream: &str) -> Result<Option<u64>, DatabaseError> {
        let row = self
            .client
            .query_opt("SELECT next_offset FROM audit_sink_offset WHERE stream = $1", &[&stream])
            .await
            .map_err(self.query_error("reading the stored offset"))?;
        row.map(|row| {
            let offset: i64 = row.get(0);
            u64::try_from(offset).map_err(|_| DatabaseError::BadOffset { stream: stream.to_string(), offset })
        })
        .transpose()
    }

    /// Stores the records of `messages` (read from `stream`) and `next_offset` as the stream's
    /// resume point, in one transaction: after a crash, either all of it is stored or none. A
    /// record already stored with the same bytes is counted as a duplicate; a line that is not a
    /// record, or a record whose key is stored with other bytes, goes to `audit_rejected_line`.
    pub async fn store(
        &mut self,
        stream: &str,
        messages: &[Message<'_>],
        next_offset: u64,
    ) -> Result<Stored, DatabaseError> {
        let mut rows = Rows::default();
        let mut stored = Stored::default();
        let mut rejected: Vec<(Rejection, Vec<u8>)> = Vec::new();
        for message in messages {
            for (line_no, line) in lines(message.body) {
                match parse(line) {
                    Ok(record) => rows.push(record, message.offset, line_no, line),
                    Err(problem) => {
                        rejected.push((Rejection { offset: message.offset, line_no, problem }, line.to_vec()))
                    }
                }
            }
        }
        let url = self.url.clone();
        let url = &url;
        let failed = |what: &'static str| move |source| DatabaseError::Query { what, url: url.clone(), source };
        let transaction = self.client.transaction().await.map_err(failed("starting a transaction"))?;
        if !rows.keys.is_empty() {
            let stream = stream.to_string();
            let inserted = transaction
                .query(INSERT_RECORDS, &rows.params(&stream))
                .await
                .map_err(failed("storing audit records"))?;
            let mut fresh: HashMap<(String, String, i64), u32> = HashMap::new();
            for row in &inserted {
                *fresh.entry((row.get(0), row.get(1), row.get(2))).or_default() += 1;
            }
            stored.records = inserted.len() as u64;
            // The rows not inserted: their key was there already (or twice in this batch).
            let mut again = Vec::new();
            for (at, key) in rows.keys.iter().enumerate() {
                match fresh.get_mut(key) {
                    Some(left) if *left > 0 => *left -= 1,
                    _ => again.push(at),
                }
            }
            if !again.is_empty() {
                let workers: Vec<&str> = again.iter().map(|&at| rows.keys[at].0.as_str()).collect();
                let chains: Vec<&str> = again.iter().map(|&at| rows.keys[at].1.as_str()).collect();
                let seqs: Vec<i64> = again.iter().map(|&at| rows.keys[at].2).collect();
                let there = transaction
                    .query(SELECT_BODIES, &[&workers, &chains, &seqs])
                    .await
                    .map_err(failed("reading stored records"))?;
                let bodies: HashMap<(String, String, i64), String> =
                    there.iter().map(|row| ((row.get(0), row.get(1), row.get(2)), row.get(3))).collect();
                for at in again {
                    if bodies.get(&rows.keys[at]) == Some(&rows.body[at]) {
                        stored.duplicates += 1;
                        continue;
                    }
                    let (worker, chain, seq) = &rows.keys[at];
                    let problem = format!(
                        "worker {worker:?} chain {chain} seq {seq} is already stored with other bytes: two \
                         different records claim the same place in the chain"
                    );
                    let rejection =
                        Rejection { offset: rows.offset[at] as u64, line_no: rows.line_no[at] as u32, problem };
                    rejected.push((rejection, rows.body[at].as_bytes().to_vec()));
                }
            }
        }
        for (rejection, line) in &rejected {
            let offset = i64::try_from(rejection.offset).unwrap_or(i64::MAX);
            let line_no = i32::try_from(rejection.line_no).unwrap_or(i32::MAX);
            transaction
                .execute(INSERT_REJECTED, &[&stream, &offset, &line_no, line, &rejection.problem])
                .await
                .map_err(failed("keeping a rejected line"))?;
        }
        let next = i64::try_from(next_offset).unwrap_or(i64::MAX);
        transaction.execute(UPSERT_OFFSET, &[&stream, &next]).await.map_err(failed("storing the offset"))?;
        transaction.commit().await.map_err(failed("committing"))?;
        stored.rejected = rejected.into_iter().map(|(rejection, _)| rejection).collect();
        Ok(stored)
    }

    /// The bytes of every stored record of the job `job_id` (more than one when the job was
    /// answered again after an outage), oldest first.
    pub async fn find_by_job_id(&self, job_id: &str) -> Result<Vec<String>, DatabaseError> {
        let rows = self
            .client
            .query(
                "SELECT body FROM audit_record WHERE job_id = $1 ORDER BY scored_ms, worker_id, chain_id, seq",
                &[&job_id],
            )
            .await
            .map_err(self.query_error("finding a job's records"))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Every stored record of every chain that has a record answered in `[since_ms, until_ms)`
    /// (epoch milliseconds) and matches `filters`, ordered by worker, chain and `seq`: whole
    /// chains, so that each can be verified from its first record.
    pub async fn records_since(
        &self,
        since_ms: i64,
        until_ms: i64,
        filters: &Filters,
    ) -> Result<Vec<StoredRecord>, DatabaseError> {
        let rows = self
            .client
            .query(
                SELECT_CHAINS,
                &[&since_ms, &until_ms, &filters.worker_id, &filters.chain_id, &filters.model, &filters.version],
            )
            .await
            .map_err(self.query_error("reading chains"))?;
        Ok(rows
            .iter()
            .map(|row| StoredRecord {
                worker_id: row.get(0),
                chain_id: row.get(1),
                seq: row.get(2),
                stream_offset: row.get(3),
                body: row.get(4),
            })
            .collect())
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        // The client is dropped with the struct, which ends the connection task; aborting it
        // too makes sure nothing is left running when the caller's runtime goes on.
        self.connection.abort();
    }
}

const INSERT_RECORDS: &str = "\
INSERT INTO audit_record (worker_id, chain_id, seq, prev_sha256, job_id, correlation_id, user_id, app_id, queue, \
    lane, model, version, model_sha256, inputs_sha256, outputs_sha256, encrypted, status, error_code, received_ms, \
    scored_ms, batch_id, stream, stream_offset, line_no, body, body_sha256) \
SELECT worker_id, chain_id, seq, prev_sha256, job_id, correlation_id, user_id, app_id, queue, lane, model, version, \
    model_sha256, inputs_sha256, outputs_sha256, encrypted, status, error_code, received_ms, scored_ms, batch_id, \
    $22::text, stream_offset, line_no, body, body_sha256 \
FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], \
    $9::text[], $10::text[], $11::text[], $12::int8[], $13::text[], $14::text[], $15::text[], $16::bool[], \
    $17::text[], $18::text[], $19::int8[], $20::int8[], $21::int8[], $23::int8[], $24::int4[], $25::text[], \
    $26::text[]) \
    AS r(worker_id, chain_id, seq, prev_sha256, job_id, correlation_id, user_id, app_id, queue, lane, model, \
    version, model_sha256, inputs_sha256, outputs_sha256, encrypted, status, error_code, received_ms, scored_ms, \
    batch_id, stream_offset, line_no, body, body_sha256) \
ON CONFLICT (worker_id, chain_id, seq) DO NOTHING \
RETURNING worker_id, chain_id, seq";

const SELECT_BODIES: &str = "\
SELECT a.worker_id, a.chain_id, a.seq, a.body FROM audit_record a \
JOIN UNNEST($1::text[], $2::text[], $3::int8[]) AS k(worker_id, chain_id, seq) \
    ON a.worker_id = k.worker_id AND a.chain_id = k.chain_id AND a.seq = k.seq";

const INSERT_REJECTED: &str = "\
INSERT INTO audit_rejected_line (stream, \"offset\", line_no, body, problem) VALUES ($1, $2, $3, $4, $5) \
ON CONFLICT (stream, \"offset\", line_no) DO NOTHING";

// An offset never moves back: a sink that somehow ran behind another cannot undo its progress.
const UPSERT_OFFSET: &str = "\
INSERT INTO audit_sink_offset (stream, next_offset) VALUES ($1, $2) \
ON CONFLICT (stream) DO UPDATE SET next_offset = GREATEST(audit_sink_offset.next_offset, EXCLUDED.next_offset)";

const SELECT_CHAINS: &str = "\
SELECT worker_id, chain_id, seq, stream_offset, body FROM audit_record \
WHERE (worker_id, chain_id) IN ( \
    SELECT DISTINCT worker_id, chain_id FROM audit_record \
    WHERE scored_at >= to_timestamp($1::int8::float8 / 1000) AND scored_at < to_timestamp($2::int8::float8 / 1000) \
      AND ($3::text IS NULL OR worker_id = $3) AND ($4::text IS NULL OR chain_id = $4) \
      AND ($5::text IS NULL OR model = $5) AND ($6::int8 IS NULL OR version = $6)) \
ORDER BY worker_id, chain_id, seq";

/// The lines of a JSON Lines body with their numbers from 0; a final line break ends the last
/// line rather than starting an empty one.
fn lines(body: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let mut lines = body.split(|&byte| byte == b'\n').enumerate().map(|(n, line)| (n as u32, line));
    // An empty body holds no line at all, not one empty line.
    let empty = body.is_empty();
    std::iter::from_fn(move || if empty { None } else { lines.next() })
}

/// The columns of one record.
#[derive(Debug)]
struct Record {
    worker_id: String,
    chain_id: String,
    seq: i64,
    prev_sha256: Option<String>,
    job_id: Option<String>,
    correlation_id: Option<String>,
    user_id: Option<String>,
    app_id: Option<String>,
    queue: String,
    lane: String,
    model: Option<String>,
    version: Option<i64>,
    model_sha256: Option<String>,
    inputs_sha256: Option<String>,
    outputs_sha256: Option<String>,
    encrypted: bool,
    status: String,
    error_code: Option<String>,
    received_ms: i64,
    scored_ms: i64,
    batch_id: Option<i64>,
}

/// A line as a record, or what keeps it from being one. Members the sink does not know are left
/// in the stored bytes, so a record of a later version is still stored.
fn parse(line: &[u8]) -> Result<Record, String> {
    let text = std::str::from_utf8(line).map_err(|error| format!("not UTF-8: {error}"))?;
    if text.trim().is_empty() {
        return Err("an empty line".into());
    }
    let value: Value = serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))?;
    let Value::Object(members) = value else {
        return Err("not a JSON object".into());
    };
    let m = Members(&members);
    Ok(Record {
        worker_id: m.text("worker_id")?,
        chain_id: m.text("chain_id")?,
        seq: m.integer("seq")?,
        prev_sha256: m.nullable_text("prev_sha256")?,
        job_id: m.nullable_text("job_id")?,
        correlation_id: m.nullable_text("correlation_id")?,
        user_id: m.nullable_text("user_id")?,
        app_id: m.nullable_text("app_id")?,
        queue: m.text("queue")?,
        lane: m.text("lane")?,
        model: m.nullable_text("model")?,
        version: m.nullable_integer("version")?,
        model_sha256: m.nullable_text("model_sha256")?,
        inputs_sha256: m.nullable_text("inputs_sha256")?,
        outputs_sha256: m.nullable_text("outputs_sha256")?,
        encrypted: m.boolean("encrypted")?,
        status: m.text("status")?,
        error_code: m.nullable_text("error_code")?,
        received_ms: m.integer("received_ms")?,
        scored_ms: m.integer("scored_ms")?,
        batch_id: m.nullable_integer("batch_id")?,
    })
}

/// A record's members, read with the schema's rules: every member present, `null` only where
/// the schema allows it.
struct Members<'a>(&'a Map<String, Value>);

impl Members<'_> {
    fn get(&self, name: &str) -> Result<&Value, String> {
        self.0.get(name).ok_or_else(|| format!("member {name} is missing"))
    }

    fn text(&self, name: &str) -> Result<String, String> {
        match self.get(name)? {
            Value::String(text) if !text.is_empty() => Ok(text.clone()),
            other => Err(format!("member {name} must be a non-empty string, not {other}")),
        }
    }

    fn nullable_text(&self, name: &str) -> Result<Option<String>, String> {
        match self.get(name)? {
            Value::Null => Ok(None),
            Value::String(text) => Ok(Some(text.clone())),
            other => Err(format!("member {name} must be a string or null, not {other}")),
        }
    }

    fn nullable_integer(&self, name: &str) -> Result<Option<i64>, String> {
        match self.get(name)? {
            Value::Null => Ok(None),
            Value::Number(number) => match number.as_i64() {
                Some(n) if n >= 0 => Ok(Some(n)),
                _ => Err(format!("member {name} must be an integer from 0 to 2^63-1, not {number}")),
            },
            other => Err(format!("member {name} must be an integer or null, not {other}")),
        }
    }

    fn integer(&self, name: &str) -> Result<i64, String> {
        self.nullable_integer(name)?.ok_or_else(|| format!("member {name} must be an integer, not null"))
    }

    fn boolean(&self, name: &str) -> Result<bool, String> {
        match self.get(name)? {
            Value::Bool(flag) => Ok(*flag),
            other => Err(format!("member {name} must be true or false, not {other}")),
        }
    }
}

/// Records as columns, for one `INSERT … SELECT FROM UNNEST` of the whole batch.
#[derive(Default)]
struct Rows {
    keys: Vec<(String, String, i64)>,
    prev_sha256: Vec<Option<String>>,
    job_id: Vec<Option<String>>,
    correlation_id: Vec<Option<String>>,
    user_id: Vec<Option<String>>,
    app_id: Vec<Option<String>>,
    queue: Vec<String>,
    lane: Vec<String>,
    model: Vec<Option<String>>,
    version: Vec<Option<i64>>,
    model_sha256: Vec<Option<String>>,
    inputs_sha256: Vec<Option<String>>,
    outputs_sha256: Vec<Option<String>>,
    encrypted: Vec<bool>,
    status: Vec<String>,
    error_code: Vec<Option<String>>,
    received_ms: Vec<i64>,
    scored_ms: Vec<i64>,
    batch_id: Vec<Option<i64>>,
    offset: Vec<i64>,
    line_no: Vec<i32>,
    body: Vec<String>,
    body_sha256: Vec<String>,
    // Split out of `keys` for the statement's parameters.
    worker_id: Vec<String>,
    chain_id: Vec<String>,
    seq: Vec<i64>,
}

impl Rows {
    fn push(&mut self, record: Record, offset: u64, line_no: u32, line: &[u8]) {
        self.keys.push((record.worker_id.clone(), record.chain_id.clone(), record.seq));
        self.worker_id.push(record.worker_id);
        self.chain_id.push(record.chain_id);
        self.seq.push(record.seq);
        self.prev_sha256.push(record.prev_sha256);
        self.job_id.push(record.job_id);
        self.correlation_id.push(record.correlation_id);
        self.user_id.push(record.user_id);
        self.app_id.push(record.app_id);
        self.queue.push(record.queue);
        self.lane.push(record.lane);
        self.model.push(record.model);
        self.version.push(record.version);
        self.model_sha256.push(record.model_sha256);
        self.inputs_sha256.push(record.inputs_sha256);
        self.outputs_sha256.push(record.outputs_sha256);
        self.encrypted.push(record.encrypted);
        self.status.push(record.status);
        self.error_code.push(record.error_code);
        self.received_ms.push(record.received_ms);
        self.scored_ms.push(record.scored_ms);
        self.batch_id.push(record.batch_id);
        self.offset.push(i64::try_from(offset).unwrap_or(i64::MAX));
        self.line_no.push(i32::try_from(line_no).unwrap_or(i32::MAX));
        // `parse` read the line as UTF-8 already.
        self.body.push(String::from_utf8_lossy(line).into_owned());
        self.body_sha256.push(record::digest(line));
    }

    /// The parameters of [`INSERT_RECORDS`], `$1` to `$26`.
    fn params<'a>(&'a self, stream: &'a String) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
        vec![
            &self.worker_id,
            &self.chain_id,
            &self.seq,
            &self.prev_sha256,
            &self.job_id,
            &self.correlation_id,
            &self.user_id,
            &self.app_id,
            &self.queue,
            &self.lane,
            &self.model,
            &self.version,
            &self.model_sha256,
            &self.inputs_sha256,
            &self.outputs_sha256,
            &self.encrypted,
            &self.status,
            &self.error_code,
            &self.received_ms,
            &self.scored_ms,
            &self.batch_id,
            stream,
            &self.offset,
            &self.line_no,
            &self.body,
            &self.body_sha256,
        ]
    }
}

/// A connection's URL without its password: `postgres://user@host:port/database`.
fn shown(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().map(|user| format!("{user}@")).unwrap_or_default();
    let database = config.get_dbname().unwrap_or_default();
    format!("postgres://{user}{host}:{port}/{database}")
}

/// A PostgreSQL error with its cause (the server's message): the client error alone says only
/// "db error".
fn cause(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

fn is_permission(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = r#"{"worker_id":"w1","chain_id":"3f2a6c1e-0000-4000-8000-000000000001","seq":0,"prev_sha256":null,"job_id":"j1","correlation_id":null,"user_id":"guest","app_id":null,"queue":"scoring.jobs","lane":"online","model":"credit","version":3,"model_sha256":null,"inputs_sha256":null,"outputs_sha256":null,"encrypted":false,"status":"error","error_code":"invalid_input","received_ms":1,"scored_ms":2,"batch_id":null}"#;

    #[test]
    fn every_migration_file_is_embedded_in_order() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/postgres/migrations");
        let mut files: Vec<String> = std::fs::read_dir(&folder)
            .expect("migrations folder")
            .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS.iter().map(|m| format!("{}.sql", m.name)).collect();
        assert_eq!(files, embedded, "add each file of deploy/postgres/migrations/ to MIGRATIONS, in order");
    }

    #[test]
    fn a_record_line_parses_and_a_bad_one_says_why() {
        let record = parse(RECORD.as_bytes()).expect("a record");
        assert_eq!((record.worker_id.as_str(), record.seq, record.version), ("w1", 0, Some(3)));
        assert!(parse(b"{not json").expect_err("not JSON").starts_with("not JSON"));
        let without_seq = RECORD.replace(r#""seq":0,"#, "");
        assert_eq!(parse(without_seq.as_bytes()).err().as_deref(), Some("member seq is missing"));
        let negative = RECORD.replace(r#""seq":0"#, r#""seq":-1"#);
        assert!(parse(negative.as_bytes()).expect_err("negative seq").contains("seq"));
        assert!(parse(b"[1,2]").expect_err("an array").contains("object"));
        assert!(parse(&[0xff, b'{']).expect_err("bytes").contains("UTF-8"));
    }

    #[test]
    fn json_lines_split_with_or_without_the_final_break() {
        let lines_of = |body: &[u8]| lines(body).map(|(n, l)| (n, l.to_vec())).collect::<Vec<_>>();
        assert_eq!(lines_of(b"a\nb\n"), vec![(0, b"a".to_vec()), (1, b"b".to_vec())]);
        assert_eq!(lines_of(b"a\nb"), vec![(0, b"a".to_vec()), (1, b"b".to_vec())]);
        assert_eq!(lines_of(b"a\n\nb\n"), vec![(0, b"a".to_vec()), (1, b"".to_vec()), (2, b"b".to_vec())]);
        assert!(lines_of(b"").is_empty());
    }

    #[test]
    fn a_shown_url_has_no_password() {
        let config: Config = "postgres://sink:s3cret@db.example:6432/audit".parse().expect("a URL");
        assert_eq!(shown(&config), "postgres://sink@db.example:6432/audit");
    }
}

//! Finding records: which records match a query (job, time, model, version, publisher), and
//! how the matches are shown: an aligned table for a person, or each record's bytes exactly as
//! stored, one a line (JSON Lines), for tools and for checking digests.

use std::io::Write;

use super::record::{Fields, StoredRecord};
use super::time::format_utc;

/// What a record must match; an unset filter matches every record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub job_id: Option<String>,
    /// Epoch milliseconds, on `scored_ms`, both ends included.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub model: Option<String>,
    pub version: Option<u64>,
    /// The publishing broker user: the record's `user_id`.
    pub publisher: Option<String>,
}

impl Query {
    pub fn matches(&self, fields: &Fields) -> bool {
        let same = |wanted: &Option<String>, got: &Option<String>| wanted.is_none() || wanted == got;
        let scored = fields.scored_ms;
        same(&self.job_id, &fields.job_id)
            && same(&self.model, &fields.model)
            && same(&self.publisher, &fields.user_id)
            && self.version.is_none_or(|v| fields.version == Some(v))
            && self.since_ms.is_none_or(|since| scored.is_some_and(|ms| ms >= since))
            && self.until_ms.is_none_or(|until| scored.is_some_and(|ms| ms <= until))
    }
}

/// How matches are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, one record a row.
    #[default]
    Table,
    /// Each record's bytes exactly as stored, one a line.
    Jsonl,
}

const COLUMNS: [&str; 10] = [
    "job_id",
    "model",
    "version",
    "status",
    "error_code",
    "scored_utc",
    "user_id",
    "worker_id",
    "chain_id:seq",
    "inputs_sha256",
];

/// A record's row in the table; `-` for what it lacks.
fn row(fields: &Fields) -> [String; 10] {
    let text = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
    let number = |value: Option<u64>| value.map_or_else(|| "-".into(), |v| v.to_string());
    [
        text(&fields.job_id),
        text(&fields.model),
        number(fields.version),
        text(&fields.status),
        text(&fields.error_code),
        fields.scored_ms.map_or_else(|| "-".into(), format_utc),
        text(&fields.user_id),
        text(&fields.worker_id),
        format!("{}:{}", text(&fields.chain_id), number(fields.seq)),
        text(&fields.inputs_sha256),
    ]
}

/// Collects the matches of a query and writes them in a format.
pub struct Finder {
    query: Query,
    format: Format,
    rows: Vec<[String; 10]>,
    matched: u64,
    /// Records that are not JSON objects: no filter can be applied to them.
    unreadable: u64,
}

impl Finder {
    pub fn new(query: Query, format: Format) -> Self {
        Finder { query, format, rows: Vec::new(), matched: 0, unreadable: 0 }
    }

    /// Takes the next record; a match in JSON Lines is written at once, a table row when all
    /// rows are known (its columns are as wide as their widest cell).
    pub fn push(&mut self, record: &StoredRecord, out: &mut impl Write) -> std::io::Result<()> {
        let Ok(fields) = Fields::read(&record.bytes) else {
            self.unreadable += 1;
            return Ok(());
        };
        if !self.query.matches(&fields) {
            return Ok(());
        }
        self.matched += 1;
        match self.format {
            Format::Jsonl => {
                out.write_all(&record.bytes)?;
                out.write_all(b"\n")
            }
            Format::Table => {
                self.rows.push(row(&fields));
                Ok(())
            }
        }
    }

    /// Writes the table, if any; returns the number of matches and of unreadable records.
    pub fn finish(self, out: &mut impl Write) -> std::io::Result<(u64, u64)> {
        if self.format == Format::Table && !self.rows.is_empty() {
            write_table(&self.rows, out)?;
        }
        Ok((self.matched, self.unreadable))
    }
}

fn write_table(rows: &[[String; 10]], out: &mut impl Write) -> std::io::Result<()> {
    let mut widths = COLUMNS.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    writeln!(out, "{}", aligned(COLUMNS.iter().copied(), &widths))?;
    for row in rows {
        writeln!(out, "{}", aligned(row.iter().map(String::as_str), &widths))?;
    }
    Ok(())
}

/// Cells padded to their column's width, two spaces apart, without trailing spaces.
fn aligned<'a>(cells: impl Iterator<Item = &'a str>, widths: &[usize]) -> String {
    let padded: Vec<String> = cells.zip(widths).map(|(cell, &width)| format!("{cell:<width$}")).collect();
    padded.join("  ").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(job: &str, model: &str, version: u64, user: &str, scored_ms: u64) -> StoredRecord {
        let bytes = serde_json::to_vec(&serde_json::json!({
            "worker_id": "w-1", "chain_id": "c", "seq": 4, "job_id": job, "model": model, "version": version,
            "user_id": user, "status": "ok", "error_code": null, "scored_ms": scored_ms,
            "inputs_sha256": "ab".repeat(32),
        }))
        .expect("JSON");
        StoredRecord { offset: 0, bytes }
    }

    fn found(query: Query, format: Format, records: &[StoredRecord]) -> (String, u64) {
        let mut finder = Finder::new(query, format);
        let mut out = Vec::new();
        for record in records {
            finder.push(record, &mut out).expect("written");
        }
        let (matched, _) = finder.finish(&mut out).expect("written");
        (String::from_utf8(out).expect("UTF-8"), matched)
    }

    #[test]
    fn each_filter_narrows_the_matches() {
        let records = [
            record("a", "credit", 1, "risk", 1_000),
            record("b", "credit", 2, "risk", 2_000),
            record("c", "fraud", 1, "ops", 3_000),
        ];
        let matched = |query: Query| found(query, Format::Jsonl, &records).1;
        assert_eq!(matched(Query::default()), 3);
        assert_eq!(matched(Query { job_id: Some("b".into()), ..Query::default() }), 1);
        assert_eq!(matched(Query { model: Some("credit".into()), version: Some(1), ..Query::default() }), 1);
        assert_eq!(matched(Query { publisher: Some("risk".into()), ..Query::default() }), 2);
        assert_eq!(matched(Query { since_ms: Some(2_000), until_ms: Some(3_000), ..Query::default() }), 2);
        assert_eq!(matched(Query { until_ms: Some(999), ..Query::default() }), 0);
    }

    #[test]
    fn jsonl_holds_the_bytes_as_stored_and_the_table_every_column() {
        let records = [record("a", "credit", 1, "risk", 1_772_546_700_250), record("bb", "credit", 12, "r", 0)];
        let (jsonl, _) = found(Query::default(), Format::Jsonl, &records);
        assert_eq!(
            jsonl.as_bytes(),
            [records[0].bytes.as_slice(), b"\n".as_slice(), records[1].bytes.as_slice(), b"\n".as_slice()].concat()
        );
        let (table, matched) = found(Query::default(), Format::Table, &records);
        assert_eq!(matched, 2);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("job_id  model   version  status"), "{table}");
        assert!(lines[1].contains("2026-03-03T14:05:00.250Z") && lines[1].contains(&"ab".repeat(32)), "{table}");
        assert!(lines[1].contains("w-1        c:4"), "{table}");
        let column = lines[0].find("model").expect("model column");
        assert_eq!(&lines[2][column..column + 6], "credit", "aligned:\n{table}");
    }
}

//! The `submit` command: a bulk client. Reads rows from CSV or JSONL, sends them as jobs of
//! `--chunk-rows` rows, waits for every result and writes the outputs in input order. With
//! `--key-file` it encrypts the jobs and decrypts their results ([`crate::payload`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use crate::amqp::client::{Addressing, JobClient, Published, Reply};
use crate::amqp::redact;
use crate::payload::{self, KeyError, Keyring, Opened, PayloadKey, Refusal};
use crate::settings::Settings;

#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// Model to score with.
    #[arg(long)]
    pub model: String,
    /// Pin a model version (default: the version the worker serves as latest).
    #[arg(long)]
    pub model_version: Option<u64>,
    /// Input rows: .csv (a header row names the features) or .jsonl (an array or object per line).
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write outputs, one line per input row: .csv or .jsonl.
    #[arg(long)]
    pub output: PathBuf,
    /// Rows per job.
    #[arg(long, default_value_t = 1000)]
    pub chunk_rows: usize,
    /// Ask for explanations: CSV output gains `reason_1`..`reason_k` (each reason's code, or its
    /// feature without one); JSONL output gains each row's `explanation` object.
    #[arg(long)]
    pub explain: bool,
    /// Give up when connecting, publishing and collecting every result take longer than this.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Encrypt the jobs with AES-256-GCM under the 256-bit key in this file (32 raw bytes, 64 hex
    /// digits or base64 of 32 bytes), and decrypt their results with it. Needs --key-id.
    #[arg(long, requires = "key_id", value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// The id of --key-file's key among the worker's security.payload_keys (sent as x-key-id).
    #[arg(long, requires = "key_file", value_name = "ID")]
    pub key_id: Option<String>,
    /// Publish the jobs to this exchange, routed by the jobs queue's name (amqp.jobs_queue), as
    /// publishers do that may write only to an exchange (deploy/rabbitmq: scoring.submit).
    #[arg(long, value_name = "NAME")]
    pub exchange: Option<String>,
    /// Read results from this existing queue (e.g. core-banking.results) instead of declaring a
    /// private one, which needs the right to configure queues. Results of other runs found there
    /// are left in it.
    #[arg(long, value_name = "QUEUE")]
    pub reply_queue: Option<String>,
    /// Send the jobs with this user_id: the broker checks it is the user logged in, and the
    /// worker's publisher rules (security.require_user_id, allowed_publishers) read it.
    #[arg(long, value_name = "USER")]
    pub user_id: Option<String>,
}

/// What `submit` did, printed at the end.
#[derive(Debug)]
pub struct Summary {
    pub rows: usize,
    pub jobs: usize,
    pub elapsed: Duration,
    pub output: PathBuf,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let seconds = self.elapsed.as_secs_f64();
        write!(
            f,
            "scored {} rows in {} jobs in {seconds:.2} s ({:.0} rows/s); results in {}",
            self.rows,
            self.jobs,
            self.rows as f64 / seconds.max(1e-9),
            self.output.display()
        )
    }
}

/// Rows as JSON text, so each job body is assembled without re-encoding.
struct InputRows {
    /// `"rows"` (arrays) or `"records"` (objects).
    field: &'static str,
    items: Vec<String>,
}

pub async fn run(settings: &Settings, args: &SubmitArgs) -> anyhow::Result<Summary> {
    if args.chunk_rows == 0 {
        bail!("--chunk-rows must be at least 1");
    }
    let key = payload_key(args)?;
    let input = read_input(&args.input)?;
    if input.items.is_empty() {
        bail!("{} holds no rows", args.input.display());
    }
    let started = Instant::now();
    let chunks: Vec<&[String]> = input.items.chunks(args.chunk_rows).collect();
    let ordered = exchange(settings, args, key.as_ref(), input.field, &chunks).await?;
    let elapsed = started.elapsed();
    check_all_ok(&ordered, &chunks, args.chunk_rows)?;
    write_output(&args.output, &ordered, args.explain)?;
    Ok(Summary { rows: input.items.len(), jobs: chunks.len(), elapsed, output: args.output.clone() })
}

/// Connects, publishes one job per chunk and collects their results in job order, all within
/// `--timeout-s`: a broker that blocks publishers (a memory or disk alarm) holds publishing and its
/// confirms for as long as the alarm lasts.
async fn exchange(
    settings: &Settings,
    args: &SubmitArgs,
    key: Option<&PayloadKey>,
    field: &str,
    chunks: &[&[String]],
) -> anyhow::Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let url = redact(&settings.amqp.url);
    let addressing = Addressing {
        exchange: args.exchange.clone(),
        reply_queue: args.reply_queue.clone(),
        user_id: args.user_id.clone(),
    };
    let connecting = JobClient::connect(&settings.amqp, &addressing);
    let mut client = tokio::time::timeout_at(deadline, connecting).await.map_err(|_| {
        anyhow!("the broker at {url} did not open a connection within {} s (--timeout-s)", args.timeout_s)
    })??;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let jobs = chunks.iter().enumerate().map(|(index, chunk)| {
        let job_id = format!("{run_id}-{index}");
        let body = job_body(&job_id, args, field, chunk).into_bytes();
        let body = match key {
            Some(key) => key.seal(&body),
            None => body,
        };
        (job_id, body)
    });
    let mut results = HashMap::with_capacity(chunks.len());
    let exchanged = async {
        match client.publish_all(jobs, key).await? {
            Published::Stored => {}
            Published::Refused => bail!("the broker refused a job; nothing was scored reliably, submit again"),
            Published::Unroutable => {
                let (exchange, routing_key) = client.route();
                let exchange = if exchange.is_empty() { "the default exchange" } else { exchange };
                bail!(
                    "jobs sent to {exchange} with routing key {routing_key:?} reached no queue; bind the jobs queue \
                     to the exchange, or check --exchange and amqp.jobs_queue"
                )
            }
        }
        collect(&mut client, key, &run_id, chunks.len(), &mut results).await
    };
    let outcome = tokio::time::timeout_at(deadline, exchanged).await;
    let blocked = client.blocked();
    client.close().await;
    match outcome {
        Ok(done) => done.map(|()| (0..chunks.len()).map(|i| results.remove(&i).unwrap_or(Value::Null)).collect()),
        Err(_) if blocked => bail!(
            "the broker at {url} blocked publishing for {} s (--timeout-s): it raised a resource alarm, short of \
             memory or disk (`rabbitmq-diagnostics alarms` names it). Free memory or disk on the broker, then submit again",
            args.timeout_s
        ),
        Err(_) => bail!(
            "{} of {} results arrived within {} s (--timeout-s); is a worker consuming {}?",
            results.len(),
            chunks.len(),
            args.timeout_s,
            settings.amqp.jobs_queue
        ),
    }
}

/// The key of `--key-file` and `--key-id`, when given.
fn payload_key(args: &SubmitArgs) -> Result<Option<PayloadKey>, KeyError> {
    let (Some(path), Some(id)) = (&args.key_file, &args.key_id) else { return Ok(None) };
    if !payload::valid_key_id(id) {
        return Err(KeyError::BadId { origin: "--key-id".into(), id: id.clone() });
    }
    PayloadKey::load("--key-file", id, path).map(Some)
}

/// Collects the results of jobs `0..jobs` of this run into `results`, by job index.
async fn collect(
    client: &mut JobClient,
    key: Option<&PayloadKey>,
    run_id: &str,
    jobs: usize,
    results: &mut HashMap<usize, Value>,
) -> anyhow::Result<()> {
    let keyring = Keyring::of(key.cloned(), false);
    while results.len() < jobs {
        let reply = client.next_result().await?.ok_or_else(|| anyhow!("the reply queue closed"))?;
        // A named reply queue may hold other runs' results, sealed with keys this run lacks.
        let other_run = reply.correlation_id.as_deref().is_some_and(|id| !id.starts_with(run_id));
        if other_run {
            continue;
        }
        let body = open_result(&keyring, key, &reply)?;
        let body: Value = serde_json::from_slice(&body).context("a result is not JSON")?;
        if key.is_some() && reply.sealing().is_none() && body["status"] == "ok" {
            bail!("a result with scores arrived unencrypted although its job was encrypted; it is not trusted");
        }
        let index = body["job_id"]
            .as_str()
            .and_then(|id| id.strip_prefix(run_id))
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(index) = index {
            // A redelivered job may be answered twice; its results are identical.
            results.entry(index).or_insert(body);
            client.accept(&reply).await?;
        }
    }
    Ok(())
}

/// A result's plaintext body. Results of encrypted jobs come encrypted with the job's key; a job
/// the worker refused to decrypt is answered in plaintext (`forbidden`).
fn open_result<'a>(keyring: &Keyring, key: Option<&PayloadKey>, reply: &'a Reply) -> anyhow::Result<Cow<'a, [u8]>> {
    match keyring.open(reply.sealing(), &reply.body) {
        Ok(Opened::Plain(body)) => Ok(Cow::Borrowed(body)),
        Ok(Opened::Sealed { plaintext, .. }) => Ok(Cow::Owned(plaintext)),
        Err(Refusal::UnknownKey(id)) => match key {
            Some(key) => bail!(
                "a result is encrypted with key id {id:?}, not with {:?} (--key-id); it cannot be decrypted",
                key.id()
            ),
            None => bail!("a result is encrypted with key id {id:?}; pass --key-file and --key-id to decrypt it"),
        },
        Err(Refusal::Unauthentic(id)) => bail!(
            "a result could not be decrypted with key id {id:?} (--key-file): it was altered, or the worker's key of \
             that id is not the one in --key-file"
        ),
        Err(refusal) => bail!("a result cannot be read: {refusal}"),
    }
}

/// Fails naming the input rows of every job that was not scored.
fn check_all_ok(results: &[Value], chunks: &[&[String]], chunk_rows: usize) -> anyhow::Result<()> {
    let failures: Vec<String> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r["status"] != "ok")
        .map(|(i, r)| {
            let first = i * chunk_rows;
            format!("rows {}..{}: {} {}", first, first + chunks[i].len(), r["error"]["code"], r["error"]["message"])
        })
        .collect();
    if !failures.is_empty() {
        bail!("{} of {} jobs failed:\n  {}", failures.len(), chunks.len(), failures.join("\n  "));
    }
    Ok(())
}

fn job_body(job_id: &str, args: &SubmitArgs, field: &str, items: &[String]) -> String {
    let mut body = String::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 128);
    let _ = write!(body, r#"{{"job_id":{},"model":{}"#, Value::from(job_id), Value::from(args.model.as_str()));
    if let Some(version) = args.model_version {
        let _ = write!(body, r#","model_version":"{version}""#);
    }
    if args.explain {
        body.push_str(r#","explain":true"#);
    }
    let _ = write!(body, r#","{field}":["#);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    body
}

fn read_input(path: &Path) -> anyhow::Result<InputRows> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    match extension(path) {
        "csv" => read_csv(file, path),
        "jsonl" | "ndjson" => read_jsonl(file, path),
        _ => bail!("{}: input must be .csv or .jsonl", path.display()),
    }
}

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or_default()
}

/// A header row (any field that is not a number) turns rows into named records.
fn read_csv(file: std::fs::File, path: &Path) -> anyhow::Result<InputRows> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).trim(csv::Trim::All).from_reader(file);
    let mut records = reader.records();
    let Some(first) = records.next().transpose()? else {
        return Ok(InputRows { field: "rows", items: Vec::new() });
    };
    let header: Option<Vec<String>> = first
        .iter()
        .any(|f| f.parse::<f64>().is_err())
        .then(|| first.iter().map(|name| Value::from(name).to_string()).collect());
    let mut items = Vec::new();
    let rows = header.is_none().then_some(Ok(first)).into_iter().chain(records);
    for (line, record) in rows.enumerate() {
        let record = record?;
        let line = line + if header.is_some() { 2 } else { 1 };
        let mut item = String::new();
        item.push(if header.is_some() { '{' } else { '[' });
        for (i, field) in record.iter().enumerate() {
            let value: f64 = field.parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| {
                anyhow!("{} line {line}, column {}: {field:?} is not a finite number", path.display(), i + 1)
            })?;
            if i > 0 {
                item.push(',');
            }
            if let Some(names) = &header {
                let name = names
                    .get(i)
                    .ok_or_else(|| anyhow!("{} line {line} has more fields than the header", path.display()))?;
                let _ = write!(item, "{name}:");
            }
            let _ = write!(item, "{value}");
        }
        item.push(if header.is_some() { '}' } else { ']' });
        items.push(item);
    }
    Ok(InputRows { field: if header.is_some() { "records" } else { "rows" }, items })
}

fn read_jsonl(file: std::fs::File, path: &Path) -> anyhow::Result<InputRows> {
    let mut field = None;
    let mut items = Vec::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let kind = match serde_json::from_str::<Value>(&line) {
            Ok(Value::Array(_)) => "rows",
            Ok(Value::Object(_)) => "records",
            Ok(_) => bail!("{} line {}: expected an array or an object", path.display(), number + 1),
            Err(e) => bail!("{} line {}: {e}", path.display(), number + 1),
        };
        if *field.get_or_insert(kind) != kind {
            bail!("{} line {}: mixes arrays and objects; use one form", path.display(), number + 1);
        }
        items.push(line);
    }
    Ok(InputRows { field: field.unwrap_or("rows"), items })
}

/// One output row: its values by output name, and its explanation when asked for.
struct OutputRow {
    values: Vec<(String, Value)>,
    explanation: Option<Value>,
}

fn output_rows(results: &[Value]) -> impl Iterator<Item = OutputRow> + '_ {
    results.iter().flat_map(|result| {
        let outputs = result["outputs"].as_object().cloned().unwrap_or_default();
        let n = result["rows"].as_u64().unwrap_or(0) as usize;
        (0..n).map(move |i| OutputRow {
            values: outputs.iter().map(|(name, values)| (name.clone(), values[i].clone())).collect(),
            explanation: result["explanations"].get(i).cloned(),
        })
    })
}

/// A reason's cell: its code, or its feature when it has none.
fn reason_cell(reason: &Value) -> String {
    reason["code"].as_str().or_else(|| reason["feature"].as_str()).unwrap_or_default().to_string()
}

fn write_output(path: &Path, results: &[Value], explain: bool) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::new(file);
    match extension(path) {
        "jsonl" | "ndjson" => {
            for row in output_rows(results) {
                let mut object: serde_json::Map<_, _> = row.values.into_iter().collect();
                if let Some(explanation) = row.explanation {
                    object.insert("explanation".into(), explanation);
                }
                serde_json::to_writer(&mut out, &object)?;
                out.write_all(b"\n")?;
            }
        }
        "csv" => {
            // As many reason columns as the row with the most reasons has.
            let reasons = if explain {
                let explanations = results.iter().filter_map(|r| r["explanations"].as_array()).flatten();
                explanations.filter_map(|e| e["reasons"].as_array().map(Vec::len)).max().unwrap_or(0)
            } else {
                0
            };
            // Flexible: a row with other outputs than the first (a version with other outputs
            // took over mid-run) is written as it is rather than failing the whole output.
            let mut writer = csv::WriterBuilder::new().flexible(true).from_writer(&mut out);
            let mut header_written = false;
            for row in output_rows(results) {
                let mut cells: Vec<(String, String)> =
                    row.values.iter().flat_map(|(name, value)| flatten(name, value)).collect();
                let listed = row.explanation.as_ref().and_then(|e| e["reasons"].as_array());
                for k in 0..reasons {
                    let cell = listed.and_then(|r| r.get(k)).map(reason_cell).unwrap_or_default();
                    cells.push((format!("reason_{}", k + 1), cell));
                }
                if !header_written {
                    writer.write_record(cells.iter().map(|(name, _)| name))?;
                    header_written = true;
                }
                writer.write_record(cells.iter().map(|(_, value)| value))?;
            }
            writer.flush()?;
        }
        _ => bail!("{}: output must be .csv or .jsonl", path.display()),
    }
    out.flush()?;
    Ok(())
}

/// One CSV cell per scalar: `probabilities` [a, b] → `probabilities_0`, `probabilities_1`.
fn flatten(name: &str, value: &Value) -> Vec<(String, String)> {
    match value {
        Value::Array(items) => items.iter().enumerate().flat_map(|(i, v)| flatten(&format!("{name}_{i}"), v)).collect(),
        Value::Object(map) => map.iter().flat_map(|(k, v)| flatten(&format!("{name}_{k}"), v)).collect(),
        Value::String(s) => vec![(name.to_string(), s.clone())],
        other => vec![(name.to_string(), other.to_string())],
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::payload::{Sealing, SCHEME};

    #[test]
    fn results_are_decrypted_with_the_key_and_a_result_that_cannot_be_is_named_by_its_key_id() {
        let key = PayloadKey::new("test", "k1", &[0x91; 32]).expect("key");
        let other = PayloadKey::new("test", "k1", &[0x92; 32]).expect("key");
        let keyring = Keyring::of([key.clone()], false);
        let body = br#"{"job_id":"r-0","status":"ok"}"#;
        let sealed =
            |key: &PayloadKey, id| Reply::new(key.seal(body), Some(Sealing { scheme: Some(SCHEME), key_id: Some(id) }));
        let reply = sealed(&key, "k1");
        assert_eq!(&*open_result(&keyring, Some(&key), &reply).expect("decrypts"), &body[..]);

        let message = open_result(&keyring, Some(&key), &sealed(&other, "k1")).expect_err("another key").to_string();
        assert!(message.contains("could not be decrypted with key id \"k1\""), "{message}");
        let message = open_result(&keyring, Some(&key), &sealed(&key, "k2")).expect_err("another id").to_string();
        assert!(message.contains("key id \"k2\", not with \"k1\" (--key-id)"), "{message}");
        let message =
            open_result(&Keyring::default(), None, &sealed(&key, "k1")).expect_err("no key given").to_string();
        assert!(message.contains("key id \"k1\"") && message.contains("--key-file"), "{message}");
        // A plaintext answer (a refused job) reads as it is.
        let plain = Reply::new(body.to_vec(), None);
        assert_eq!(&*open_result(&keyring, Some(&key), &plain).expect("plaintext"), &body[..]);
    }

    #[test]
    fn csv_output_quotes_commas_quotes_and_newlines() {
        let tricky = "good, \"very\" good\nindeed";
        let results = [
            json!({"rows": 2, "outputs": {"label": [tricky, "plain"], "probabilities": [[0.25, 0.75], [0.5, 0.5]]}}),
            json!({"rows": 1, "outputs": {"label": ["a,b"], "probabilities": [[1.0, 0.0]]}}),
        ];
        let path = std::env::temp_dir().join(format!("batchscore-submit-{}.csv", uuid::Uuid::new_v4().simple()));
        write_output(&path, &results, false).expect("output written");
        let mut reader = csv::Reader::from_path(&path).expect("output is readable CSV");
        let header: Vec<String> = reader.headers().expect("header").iter().map(String::from).collect();
        let records: Vec<Vec<String>> =
            reader.records().map(|record| record.expect("record").iter().map(String::from).collect()).collect();
        let _ = std::fs::remove_file(&path);
        assert_eq!(header, ["label", "probabilities_0", "probabilities_1"]);
        assert_eq!(
            records,
            [[tricky, "0.25", "0.75"], ["plain", "0.5", "0.5"], ["a,b", "1.0", "0.0"]],
            "every value reads back as written, one record per input row"
        );
    }
}

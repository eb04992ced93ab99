//! Micro-benchmarks of the worker's CPU stages between the broker and ONNX Runtime: job decoding,
//! payload decryption and encryption, batch assembly across jobs, and result encoding.
//!
//! `cargo bench --bench micro` (add `-- --quick` for a short run, or a filter such as `decode`).
//!
//! Decoding and the payload's AES-256-GCM need nothing else. Batch assembly and result encoding carry real job metadata, which
//! holds a loaded model version; so they load the demo model `models/credit_default` in ONNX
//! Runtime (`scripts/setup.sh`, or `ORT_DYLIB_PATH`). Without it those benchmarks are skipped
//! with a note. No broker is needed: a job's delivery handle is opaque to these stages.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchscore::batcher::Pending;
use batchscore::budget::RowBudget;
use batchscore::encode::{self, Timing};
use batchscore::engine::model::ModelConfig;
use batchscore::engine::{runtime, Column, ModelVersion};
use batchscore::flow::{CloseReason, Delivery, Job, JobMeta, Lane, Protocol};
use batchscore::job::{self, Envelope, Features};
use batchscore::payload::PayloadKey;
use batchscore::settings::{BatchingSettings, InferenceSettings, LimitSettings};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use serde_json::{json, Value};

const MODEL: &str = "credit_default";
const BATCH_ROWS: usize = 1024;

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let samples = Samples::read();
    decode(&mut criterion, &samples);
    payload(&mut criterion, &samples);
    match Fixture::open() {
        Ok(fixture) => {
            batch_assembly(&mut criterion, &fixture, &samples);
            result_encoding(&mut criterion, &fixture, &samples);
        }
        Err(why) => eprintln!("batch and encode benchmarks skipped: {why}"),
    }
    criterion.final_summary();
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The demo model's sample rows and records, repeated to any job size.
struct Samples {
    rows: Vec<Value>,
    records: Vec<Value>,
}

impl Samples {
    fn read() -> Self {
        let dir = root().join("models").join(MODEL).join("samples");
        let read = |file: &str, field: &str| -> Vec<Value> {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            match body.get(field) {
                Some(Value::Array(items)) if !items.is_empty() => items.clone(),
                _ => panic!("{} has no {field}", path.display()),
            }
        };
        Self { rows: read("job_rows.json", "rows"), records: read("job_records.json", "records") }
    }

    fn n_features(&self) -> usize {
        self.rows[0].as_array().map_or(0, Vec::len)
    }

    /// A job body as a client sends it: compact JSON with `n` rows in the given form.
    fn body(&self, field: &str, n: usize) -> Vec<u8> {
        let source = if field == "rows" { &self.rows } else { &self.records };
        let items: Vec<&Value> = source.iter().cycle().take(n).collect();
        serde_json::to_vec(&json!({ "job_id": format!("bench-{field}-{n}"), "model": MODEL, field: items }))
            .expect("sample values serialise")
    }

    /// `n` rows, row-major, as the batcher receives them.
    fn matrix(&self, n: usize) -> Vec<f32> {
        let body = self.body("rows", n);
        let request = job::decode(envelope(&body), &LimitSettings::default()).expect("sample rows decode");
        match request.features {
            Features::Rows { values, .. } => values,
            _ => unreachable!("a rows body decodes to rows"),
        }
    }
}

fn envelope(body: &[u8]) -> Envelope<'_> {
    Envelope { body, message_id: None, content_type: Some("application/json"), model_header: None }
}

fn decode(c: &mut Criterion, samples: &Samples) {
    let limits = LimitSettings::default();
    let mut group = c.benchmark_group("decode");
    for (field, rows) in [("rows", 1), ("rows", 100), ("rows", 10_000), ("records", 100)] {
        let body = samples.body(field, rows);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new(field, rows), &body, |b, body| {
            b.iter(|| job::decode(envelope(black_box(body)), &limits).expect("sample job decodes"));
        });
    }
    group.finish();
}

/// Sealing (a result) and opening (a job) with AES-256-GCM, per body: the cost encryption adds to
/// a job's path, beside decoding's.
fn payload(c: &mut Criterion, samples: &Samples) {
    let key = PayloadKey::new("bench", "bench", &[0x9d; 32]).expect("key");
    let mut group = c.benchmark_group("payload");
    for rows in [1, 100, 10_000] {
        let body = samples.body("rows", rows);
        let sealed = key.seal(&body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("seal", rows), &body, |b, body| b.iter(|| key.seal(black_box(body))));
        group.bench_with_input(BenchmarkId::new("open", rows), &sealed, |b, sealed| {
            b.iter(|| key.open(black_box(sealed)).expect("opens"))
        });
    }
    group.finish();
}

/// A loaded model version, for building job metadata as the consumer does.
struct Fixture {
    model: Arc<ModelVersion>,
    runtime: tokio::runtime::Runtime,
}

impl Fixture {
    fn open() -> Result<Self, String> {
        let env = runtime::environment(None).map_err(|e| e.to_string())?;
        let dir = root().join("models").join(MODEL);
        let config_path = dir.join("config.yaml");
        let config: ModelConfig = std::fs::read_to_string(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|text| ModelConfig::from_yaml(&text).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let inference = InferenceSettings { sessions: 1, intra_threads: 1, ..InferenceSettings::default() };
        let model = ModelVersion::load(
            env,
            MODEL,
            1,
            &dir.join("1/model.onnx"),
            &config,
            inference,
            BatchingSettings::default(),
        )
        .map_err(|e| e.to_string())?;

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        Ok(Self { model: Arc::new(model), runtime })
    }

    /// Metadata of one job of `rows` rows, as the consumer builds it.
    fn meta(&self, seq: u64, rows: usize) -> Arc<JobMeta> {
        Arc::new(JobMeta {
            seq,
            job_id: format!("bench-job-{seq:08}"),
            model: Arc::clone(&self.model),
            rows,
            lane: Lane::Online,
            received_at: Instant::now(),
            queued_for: Duration::ZERO,
            deadline_ms: None,
            protocol: Protocol::Native,
            publisher: None,
            delivery: Delivery::new(()),
            charge: RowBudget::new(usize::MAX).charge(rows),
            explain: None,
            key: None,
            audit: None,
        })
    }

    /// Scores `inputs` with the demo model: real output columns to encode.
    fn score(&self, inputs: &[f32], rows: usize) -> Result<Vec<Column>, String> {
        let mut session = self.runtime.block_on(self.model.session()).map_err(|e| e.to_string())?;
        self.model.run(&mut session, inputs, rows).map_err(|e| e.to_string())
    }
}

fn batch_assembly(c: &mut Criterion, fixture: &Fixture, samples: &Samples) {
    let n_features = samples.n_features();
    let mut group = c.benchmark_group("batch");
    // (jobs, rows per job, batch size). 1,000-row jobs in 1,024-row batches go one whole job per
    // batch without copying rows (the batcher's lone-job path); 512-row batches split every job.
    for (jobs, rows, max_rows) in [(100, 1, BATCH_ROWS), (10, 1000, BATCH_ROWS), (10, 1000, 512)] {
        let inputs = samples.matrix(rows);
        let metas: Vec<Arc<JobMeta>> = (0..jobs).map(|seq| fixture.meta(seq as u64, rows)).collect();
        let total = jobs * rows;
        group.throughput(Throughput::Elements(total as u64));
        let id = BenchmarkId::new(format!("{jobs}_jobs_of_{rows}_rows"), format!("max_{max_rows}"));
        group.bench_function(id, |b| {
            b.iter_batched(
                || metas.iter().map(|meta| Job { meta: Arc::clone(meta), inputs: inputs.clone() }).collect::<Vec<_>>(),
                |jobs| {
                    let mut pending = Pending::default();
                    for job in jobs {
                        pending.push(job);
                    }
                    let mut batches = Vec::with_capacity(total.div_ceil(max_rows));
                    while !pending.is_empty() {
                        batches.push(pending.take(max_rows, n_features, CloseReason::Size));
                    }
                    debug_assert_eq!(batches.iter().map(|b| b.rows).sum::<usize>(), total);
                    batches
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn result_encoding(c: &mut Criterion, fixture: &Fixture, samples: &Samples) {
    let columns = match fixture.score(&samples.matrix(BATCH_ROWS), BATCH_ROWS) {
        Ok(columns) => columns,
        Err(why) => return eprintln!("encode benchmarks skipped: the demo model did not score: {why}"),
    };
    let timing = Timing { batching: 0.412, inference: 1.237, total: 2.05 };
    let mut group = c.benchmark_group("encode_ok");
    group.throughput(Throughput::Elements(BATCH_ROWS as u64));
    for job_rows in [1, 100] {
        // Jobs of `job_rows` rows filling the batch; the last one takes what is left.
        let mut jobs = Vec::new();
        let mut start = 0;
        while start < BATCH_ROWS {
            let rows = job_rows.min(BATCH_ROWS - start);
            jobs.push((fixture.meta(jobs.len() as u64, rows), start));
            start += rows;
        }
        let id = BenchmarkId::new(format!("batch_{BATCH_ROWS}_rows"), format!("jobs_of_{job_rows}_rows"));
        group.bench_function(id, |b| {
            b.iter(|| {
                let mut bytes = 0;
                for (meta, start) in &jobs {
                    bytes += encode::encode_ok(meta, black_box(&columns), *start, timing, None).expect("encodes").len();
                }
                bytes
            });
        });
    }
    group.finish();
}

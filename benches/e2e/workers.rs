//! Worker processes: the batchscore binary and the Python workers, started on a measurement's
//! queues, watched while they work, read (readiness, batch sizes, peak memory) and stopped.

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::oneshot;

use crate::broker::Topology;
use crate::{Bench, Skip};

/// Model loading and connecting included.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The worker's own drain limit (`shutdown.timeout_ms`, 30 s) and some.
const STOP_TIMEOUT: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(5);
/// Settings that older worker builds refuse: the variable and the key it sets.
const NOOP_ENGINE: (&str, &str) = ("BATCHSCORE__INFERENCE__ENGINE=noop", "engine");
const BULK_QUEUE: (&str, &str) = ("BATCHSCORE__AMQP__BULK_QUEUE", "bulk_queue");
const PYTHON_MODEL: &str = "models/credit_default/1/model.onnx";
const PYTHON_CONFIG: &str = "models/credit_default/config.yaml";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// (a) the batchscore worker with inference replaced by zeros.
    NoopEngine,
    /// (c) the batchscore worker as shipped.
    Batchscore,
    /// (d) `benches/python/batching_worker.py`.
    PythonBatching,
    /// (e) `benches/python/per_message_worker.py`.
    PythonPerMessage,
}

impl Kind {
    pub fn is_batchscore(self) -> bool {
        matches!(self, Kind::NoopEngine | Kind::Batchscore)
    }

    fn python_script(self) -> &'static str {
        match self {
            Kind::PythonPerMessage => "benches/python/per_message_worker.py",
            _ => "benches/python/batching_worker.py",
        }
    }
}

/// A running worker process; killed when dropped without [`Worker::stop`].
pub struct Worker {
    name: String,
    kind: Kind,
    child: Child,
    log: PathBuf,
    /// `/metrics` and `/readyz` of a batchscore worker.
    metrics: Option<SocketAddr>,
    /// Fires when a Python worker prints `ready`.
    ready: Option<oneshot::Receiver<()>>,
    stopped: bool,
}

impl Worker {
    /// Starts a worker on `topology` and waits until it is ready; returns it with the moment
    /// readiness was seen. A worker that refuses a setting it does not know yet, or a Python
    /// without the packages, is a [`Skip`].
    pub async fn start(bench: &Bench, kind: Kind, topology: &Topology, name: &str) -> Result<(Worker, Instant)> {
        Self::start_with_env(bench, kind, topology, name, &[]).await
    }

    /// [`Worker::start`] with further `BATCHSCORE__…` variables for a batchscore worker (another
    /// model repository, other limits); the Python workers take none.
    pub async fn start_with_env(
        bench: &Bench,
        kind: Kind,
        topology: &Topology,
        name: &str,
        env: &[(&str, String)],
    ) -> Result<(Worker, Instant)> {
        let log = bench.logs.join(format!("{name}.log"));
        let stderr = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut worker = if kind.is_batchscore() {
            spawn_batchscore(bench, kind, topology, name, env, log, stderr)?
        } else if !env.is_empty() {
            bail!("{name}: the Python workers take no BATCHSCORE__ settings");
        } else {
            spawn_python(bench, kind, topology, name, log, stderr)?
        };
        let ready_at = worker.wait_until_ready(topology).await?;
        Ok((worker, ready_at))
    }

    async fn wait_until_ready(&mut self, topology: &Topology) -> Result<Instant> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("checking the worker process")? {
                return Err(self.start_failure(status, topology));
            }
            if self.is_ready().await {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("{}: not ready within {} s; {}", self.name, READY_TIMEOUT.as_secs(), self.log_excerpt());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn is_ready(&mut self) -> bool {
        if let Some(ready) = &mut self.ready {
            return ready.try_recv().is_ok();
        }
        match self.metrics {
            Some(addr) => http_get(addr, "/readyz").await.is_some_and(|(status, _)| status == 200),
            None => false,
        }
    }

    fn start_failure(&self, status: ExitStatus, topology: &Topology) -> anyhow::Error {
        let log = read_log(&self.log);
        let mut optional = Vec::new();
        if self.kind == Kind::NoopEngine {
            optional.push(NOOP_ENGINE);
        }
        if topology.bulk_queue.is_some() {
            optional.push(BULK_QUEUE);
        }
        for (variable, field) in optional {
            let unknown = format!("unknown field `{field}`");
            if log.contains(&unknown) {
                return anyhow::Error::new(Skip(format!(
                    "this worker build does not accept {variable} yet ({unknown})"
                )));
            }
        }
        if log.contains("ModuleNotFoundError") {
            return anyhow::Error::new(Skip(format!(
                "Python packages missing: pip install -r benches/python/requirements.txt ({})",
                last_lines(&log, 1)
            )));
        }
        anyhow!("{}: exited with {status} before it was ready; {}", self.name, self.log_excerpt())
    }

    /// Runs `work`, failing early if the worker process exits meanwhile.
    pub async fn guard<T>(&mut self, work: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            outcome = work => outcome,
            error = self.exited() => Err(error),
        }
    }

    async fn exited(&mut self) -> anyhow::Error {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return anyhow!(
                        "{}: the worker exited ({status}) while work was outstanding; {}",
                        self.name,
                        self.log_excerpt()
                    )
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(error) => return anyhow!("{}: cannot check the worker process: {error}", self.name),
            }
        }
    }

    /// Mean rows per ONNX Runtime run so far, from `/metrics`; `None` for the Python workers.
    pub async fn mean_batch_rows(&self) -> Option<f64> {
        let (status, body) = http_get(self.metrics?, "/metrics").await?;
        let sum = metric_total(&body, "batchscore_batch_rows_sum");
        let count = metric_total(&body, "batchscore_batch_rows_count");
        (status == 200 && count > 0.0).then(|| sum / count)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident memory (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM, then waits for the worker to finish what it holds and exit.
    pub async fn stop(mut self) -> Result<()> {
        self.stopped = true;
        let pid = self.child.id().to_string();
        let signalled = Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success());
        if !signalled {
            let _ = self.child.kill();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the worker to stop")? {
                if signalled && !status.success() {
                    bail!("{}: exited with {status} after SIGTERM; {}", self.name, self.log_excerpt());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{}: still running {} s after SIGTERM; killed", self.name, STOP_TIMEOUT.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_excerpt(&self) -> String {
        format!("log {}: {}", self.log.display(), last_lines(&read_log(&self.log), 6))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_batchscore(
    bench: &Bench,
    kind: Kind,
    topology: &Topology,
    name: &str,
    env: &[(&str, String)],
    log: PathBuf,
    stderr: File,
) -> Result<Worker> {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    command
        .arg("worker")
        .current_dir(&bench.root)
        .envs(topology.worker_env())
        .env("BATCHSCORE__METRICS__LISTEN", metrics.to_string())
        .env("BATCHSCORE__LOGGING__LEVEL", "warn")
        // RUST_LOG would win over the level above.
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if kind == Kind::NoopEngine {
        command.env("BATCHSCORE__INFERENCE__ENGINE", "noop");
    }
    command.envs(env.iter().map(|(key, value)| (*key, value.as_str())));
    let child = command.spawn().context("starting the batchscore worker")?;
    Ok(Worker { name: name.to_string(), kind, child, log, metrics: Some(metrics), ready: None, stopped: false })
}

fn spawn_python(
    bench: &Bench,
    kind: Kind,
    topology: &Topology,
    name: &str,
    log: PathBuf,
    stderr: File,
) -> Result<Worker> {
    let settings = &bench.settings;
    let arguments = [
        ("--url", settings.amqp.url.clone()),
        ("--queue", topology.jobs_queue().to_string()),
        ("--results-queue", topology.amqp.results_queue.clone()),
        ("--model", PYTHON_MODEL.to_string()),
        ("--features-config", PYTHON_CONFIG.to_string()),
        ("--prefetch", settings.amqp.prefetch.to_string()),
        ("--max-delay-ms", settings.batching.max_delay_ms.to_string()),
        ("--max-batch-rows", settings.batching.max_batch_rows.to_string()),
        ("--intra-threads", settings.inference.intra_threads.to_string()),
    ];
    let mut command = Command::new(&bench.python);
    command.arg(kind.python_script());
    for (flag, value) in arguments {
        command.arg(flag).arg(value);
    }
    command.current_dir(&bench.root).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(anyhow::Error::new(Skip(format!("{} not found (set BENCH_PYTHON)", bench.python))))
        }
        Err(error) => return Err(error).with_context(|| format!("starting {}", kind.python_script())),
    };
    let stdout = child.stdout.take().context("the Python worker's stdout")?;
    let ready = Some(watch_for_ready(stdout));
    Ok(Worker { name: name.to_string(), kind, child, log, metrics: None, ready, stopped: false })
}

/// Reads a Python worker's stdout to the end, signalling its `ready` line.
fn watch_for_ready(stdout: ChildStdout) -> oneshot::Receiver<()> {
    let (ready, signal) = oneshot::channel();
    std::thread::spawn(move || {
        let mut ready = Some(ready);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "ready" {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
        }
    });
    signal
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// `GET path` over HTTP/1.0: the status and the body.
async fn http_get(addr: SocketAddr, path: &'static str) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()))
    })
    .await
    .ok()
    .flatten()
}

/// Sum of every sample of `name` (all label sets) in a Prometheus scrape.
fn metric_total(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split_once('{').map_or(series, |(metric, _)| metric);
            (metric == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

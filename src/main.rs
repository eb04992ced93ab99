//! The `batchscore` command line: `worker`, `submit`, `models`, `inspect` and `audit`.

use std::path::PathBuf;
use std::process::ExitCode;

use batchscore::amqp::AmqpError;
use batchscore::auditor::sink::{SinkArgs, SinkError};
use batchscore::auditor::{AuditCommand, AuditorError};
use batchscore::engine::repository::RepositoryError;
use batchscore::engine::runtime::RuntimeError;
use batchscore::inspect::UnloadableModel;
use batchscore::payload::KeyError;
use batchscore::settings::{Settings, SettingsError};
use batchscore::submit::SubmitArgs;
use batchscore::worker::{self, StartError, Worker};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Exit code for set-up problems a person must fix before anything can run: settings, the ONNX
/// Runtime library, the model repository (including an execution provider that cannot be
/// registered), the metrics listener, the broker settings (the plaintext rule, TLS files, secret
/// files), payload key files (`security.payload_keys`, `submit --key-file`), a model file
/// `inspect` cannot load, and a broker that refuses the credentials, the vhost or the TLS
/// handshake; a `models.archive` folder that cannot be written; for `audit reproduce`, a record
/// that cannot be read or a model file found nowhere. Failures during a run exit 1, and so does a
/// job `audit reproduce` does not reproduce.
const EXIT_SETUP: u8 = 2;

#[derive(Parser)]
#[command(name = "batchscore", version, about = "Batch scoring of RabbitMQ jobs with ONNX models")]
struct Cli {
    /// Settings file; environment variables BATCHSCORE__<SECTION>__<KEY> override it.
    #[arg(long, global = true, default_value = "settings.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume jobs, score them in batches, publish results.
    Worker,
    /// Send a CSV or JSONL file as jobs, wait for every result, write them in input order.
    Submit(Box<SubmitArgs>),
    /// List the model repository: versions, signatures, sha256, which version serves.
    Models,
    /// Show a model file's inputs and outputs.
    Inspect {
        /// Path to model.onnx.
        model: PathBuf,
    },
    /// The audit trail: find records, verify chains, reproduce a score, copy the stream into
    /// PostgreSQL.
    Audit {
        #[command(subcommand)]
        command: AuditCli,
    },
}

#[derive(Subcommand)]
enum AuditCli {
    /// Tail the audit stream into PostgreSQL (audit.database), resuming where it stopped.
    Sink(SinkArgs),
    #[command(flatten)]
    Read(AuditCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The default settings file may be absent (defaults + environment); an explicit one may not.
    let required = cli.config != std::path::Path::new("settings.yaml");
    let settings = match Settings::load(&cli.config, required) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("batchscore: {}", report(&anyhow::Error::from(error)));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    match &cli.command {
        Command::Worker => batchscore::telemetry::init_logging(&settings.logging),
        // The sink is a service and logs like the worker.
        Command::Audit { command: AuditCli::Sink(_) } => batchscore::telemetry::init_logging(&settings.logging),
        // Their output is the answer; the worker's progress lines would only bury it.
        Command::Submit(_) | Command::Models | Command::Inspect { .. } | Command::Audit { .. } => {
            batchscore::telemetry::init_client_logging(&settings.logging)
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("batchscore: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // `Ok(false)`: the command ran but did not find what it was asked for (exit 1).
    let outcome = runtime.block_on(async {
        let done = match cli.command {
            Command::Worker => run_worker(settings).await,
            Command::Submit(args) => batchscore::submit::run(&settings, &args).await.map(|summary| {
                println!("{summary}");
            }),
            Command::Models => batchscore::inspect::list_models(&settings).map(|text| print!("{text}")),
            Command::Inspect { model } => batchscore::inspect::describe(&settings, &model).map(|text| print!("{text}")),
            Command::Audit { command: AuditCli::Sink(args) } => run_sink(&settings, &args).await,
            Command::Audit { command: AuditCli::Read(command) } => return run_audit(&settings, &command).await,
        };
        done.map(|()| true)
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("batchscore: {}", report(&error));
            ExitCode::from(if is_setup_error(&error) { EXIT_SETUP } else { 1 })
        }
    }
}

/// The error and its causes on one line, each said once: a cause whose text the message before
/// it already contains (an error that prints its source and also returns it from `source()`) is
/// skipped.
fn report(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Whether the error is one a person must fix before the command can work (exit 2), as opposed
/// to a failure while running (exit 1).
fn is_setup_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<StartError>()
            || cause.is::<RuntimeError>()
            || cause.is::<RepositoryError>()
            || cause.is::<SettingsError>()
            || cause.is::<KeyError>()
            || cause.is::<UnloadableModel>()
            || cause.downcast_ref::<AmqpError>().is_some_and(AmqpError::is_refusal)
            || cause.downcast_ref::<AuditorError>().is_some_and(AuditorError::is_setup)
            || cause.downcast_ref::<SinkError>().is_some_and(SinkError::is_setup)
    })
}

async fn run_worker(settings: Settings) -> anyhow::Result<()> {
    let worker = Worker::start(settings).await?;
    let shutdown = CancellationToken::new();
    worker::cancel_on_signal(shutdown.clone());
    worker.run(shutdown).await?;
    tracing::info!("worker stopped");
    Ok(())
}

/// `batchscore audit ...`: the answer on stdout, what the person should know on stderr. `false`:
/// nothing matched, or a chain is broken (exit 1).
async fn run_audit(settings: &Settings, command: &AuditCommand) -> anyhow::Result<bool> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let verdict = batchscore::auditor::run(settings, command, &mut out).await;
    std::io::Write::flush(&mut out).map_err(AuditorError::Output)?;
    let verdict = verdict?;
    if let Some(message) = &verdict.message {
        eprintln!("batchscore: {message}");
    }
    Ok(verdict.clean)
}

/// `batchscore audit sink`: a service, stopped by SIGTERM or Ctrl-C.
async fn run_sink(settings: &Settings, args: &SinkArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    worker::cancel_on_signal(shutdown.clone());
    batchscore::auditor::sink::run(settings, args, shutdown).await?;
    Ok(())
}

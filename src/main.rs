//! The `batchscore` command line: `worker`, `submit`, `models` and `inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use batchscore::amqp::AmqpError;
use batchscore::engine::runtime::RuntimeError;
use batchscore::settings::Settings;
use batchscore::submit::SubmitArgs;
use batchscore::worker::{self, StartError, Worker};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Exit code for set-up problems a person must fix (settings, ONNX Runtime library).
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
    Submit(SubmitArgs),
    /// List the model repository: versions, signatures, sha256, which version serves.
    Models,
    /// Show a model file's inputs and outputs.
    Inspect {
        /// Path to model.onnx.
        model: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The default settings file may be absent (defaults + environment); an explicit one may not.
    let required = cli.config != std::path::Path::new("settings.yaml");
    let settings = match Settings::load(&cli.config, required) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("batchscore: {error}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    batchscore::telemetry::init_logging(&settings.logging);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("batchscore: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Worker => run_worker(settings).await,
            Command::Submit(args) => batchscore::submit::run(&settings, &args).await.map(|summary| {
                println!("{summary}");
            }),
            Command::Models => batchscore::inspect::list_models(&settings).map(|text| print!("{text}")),
            Command::Inspect { model } => batchscore::inspect::describe(&settings, &model).map(|text| print!("{text}")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("batchscore: {error:#}");
            let setup = error.downcast_ref::<RuntimeError>().is_some()
                || matches!(error.downcast_ref::<StartError>(), Some(StartError::Runtime(_)))
                || error.downcast_ref::<AmqpError>().is_some_and(AmqpError::is_refusal);
            ExitCode::from(if setup { EXIT_SETUP } else { 1 })
        }
    }
}

async fn run_worker(settings: Settings) -> anyhow::Result<()> {
    let worker = Worker::start(settings).await?;
    let shutdown = CancellationToken::new();
    worker::cancel_on_signal(shutdown.clone());
    worker.run(shutdown).await?;
    tracing::info!("worker stopped");
    Ok(())
}

//! The CUDA execution provider where none is available (the CPU build of ONNX Runtime): the
//! worker either refuses to start, naming the cause and the fix, or runs on the CPU and says so.

mod common;

use batchscore::settings::{ExecutionProvider, ProviderUnavailable};
use batchscore::worker::Worker;
use common::{assert_close, expected, fixtures_repository, get, sample, Client, TestWorker};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_cuda_fails_start_up_with_the_fix() {
    let mut settings = common::settings("cuda-fail", &fixtures_repository());
    settings.inference.execution_provider = ExecutionProvider::Cuda;
    settings.inference.on_provider_unavailable = ProviderUnavailable::Fail;
    let Err(error) = Worker::start(settings).await else { panic!("a worker without CUDA must not start on cuda") };
    let message = error.to_string();
    assert!(message.contains("CUDA execution provider is unavailable"), "{message}");
    assert!(message.contains("onnxruntime-gpu==1.31.1"), "names the fix: {message}");
    assert!(message.contains("inference.on_provider_unavailable: cpu"), "names the alternative: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_cuda_falls_back_to_cpu_when_allowed_and_says_so() {
    let mut settings = common::settings("cuda-fallback", &fixtures_repository());
    settings.inference.execution_provider = ExecutionProvider::Cuda;
    settings.inference.on_provider_unavailable = ProviderUnavailable::Cpu;
    let worker = TestWorker::start(settings).await;
    let mut client = Client::new(&worker.settings).await;
    let fixture = expected("mlp_v1");
    client.send(&json!({"job_id": "fallback", "model": "mlp", "model_version": "1", "rows": fixture["rows"]})).await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    assert_close(&result["outputs"], &fixture["outputs"], "outputs");
    let (_, scrape) = get(worker.metrics, "/metrics").expect("scrape");
    let info = |provider| sample(&scrape, "batchscore_model_info", &[("model", "mlp"), ("provider", provider)]);
    assert_eq!(info("cpu"), 1.0, "model_info shows the provider in use");
    assert_eq!(info("cuda"), 0.0);
    assert_eq!(worker.stop().await, 0);
}

/// A model's config.yaml asks for CUDA while the worker's default is the CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_may_ask_for_cuda_on_its_own() {
    let repository = std::env::temp_dir().join(format!("batchscore-cuda-{}", uuid::Uuid::new_v4().simple()));
    let model = repository.join("mlp");
    std::fs::create_dir_all(model.join("1")).expect("scratch repository");
    std::fs::copy(fixtures_repository().join("mlp/1/model.onnx"), model.join("1/model.onnx")).expect("model");
    let config = std::fs::read_to_string(fixtures_repository().join("mlp/config.yaml")).expect("config");
    std::fs::write(model.join("config.yaml"), format!("{config}\nexecution_provider: cuda\ncuda_device_id: 1\n"))
        .expect("config");
    let settings = common::settings("cuda-model", &repository);
    assert_eq!(settings.inference.execution_provider, ExecutionProvider::Cpu);
    let Err(error) = Worker::start(settings).await else { panic!("the model's CUDA request must be honoured") };
    let message = error.to_string();
    assert!(message.contains("model mlp version 1"), "names the model: {message}");
    assert!(message.contains("CUDA execution provider is unavailable"), "{message}");
    let _ = std::fs::remove_dir_all(&repository);
}

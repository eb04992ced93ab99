//! batchscore: a queue-driven batch-scoring worker. Jobs arrive on RabbitMQ, rows from many
//! jobs are scored together in ONNX Runtime, and each job gets one confirmed result message.
//!
//! # Layout
//! Data flows one way, each stage in its own module, joined by bounded channels:
//!
//! - [`amqp::consumer`]: deliveries → [`job`] decode/validate → route to a batcher
//! - [`batcher`]: one per model version; forms batches across jobs, splits large jobs
//! - [`infer`]: runs a batch on a pooled session of the [`engine`]
//! - [`result`]: scatters scores back to jobs, reassembles split jobs, encodes results
//! - [`amqp::publisher`]: publishes with confirms, then acknowledges the job
//!
//! [`pipeline`] wires the stages and reconnects; [`worker`] starts everything; [`settings`]
//! and [`telemetry`] serve all stages; [`submit`] and [`inspect`] are client commands.

#![forbid(unsafe_code)]

pub mod amqp;
pub mod batcher;
pub mod engine;
pub mod infer;
pub mod inspect;
pub mod job;
pub mod pipeline;
pub mod result;
pub mod settings;
pub mod submit;
pub mod telemetry;
pub mod worker;

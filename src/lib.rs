//! batchscore: a queue-driven batch-scoring worker. Jobs arrive on RabbitMQ, rows from many
//! jobs are scored together in ONNX Runtime, and each job gets one confirmed result message.
//!
//! # Layout
//! Data flows one way, each stage in its own module, joined by bounded channels that
//! [`pipeline`] creates; [`supervisor`] owns every task, and [`flow`] holds the types they pass:
//!
//! - [`amqp::consumer`]: deliveries → decryption of encrypted jobs ([`payload`]) → [`job`]
//!   decode/validate (native form, or the Open Inference Protocol form in [`oip`]) → [`authz`]
//!   authorize (who may score which model, where results may go) → route to a batcher; [`lanes`]
//!   decides which lane takes next
//! - [`batcher`]: one per model version; forms batches across jobs, splits large jobs
//! - [`infer`]: runs a batch on a pooled session of the [`engine`]
//! - [`result`]: scatters scores back to jobs, reassembles split jobs, adds the rows'
//!   [`explain`]ations where the job asked; [`encode`] writes the bodies
//! - [`amqp::publisher`]: encrypts the results of encrypted jobs, publishes with confirms, appends
//!   each job's [`audit`] record to the audit stream, then acknowledges the job once both are
//!   confirmed
//!
//! [`amqp::endpoint`] checks where and how the worker connects (TLS, certificate login, the
//! plaintext rule) before it does; [`budget`] counts the rows each lane holds; [`reload`] keeps the served model versions in step
//! with the repository; [`worker`] starts everything; [`settings`] and [`telemetry`] serve all
//! stages; [`submit`] and [`inspect`] are client commands, and so are the [`auditor`]'s (finding
//! records, verifying chains, read through [`amqp::stream`]; reproducing a score; copying the
//! stream into PostgreSQL), which the worker never uses; [`faults`] lets tests make a stage panic.

#![forbid(unsafe_code)]

pub mod amqp;
pub mod audit;
pub mod auditor;
pub mod authz;
pub mod batcher;
pub mod budget;
pub mod encode;
pub mod engine;
pub mod explain;
#[doc(hidden)]
pub mod faults;
pub mod flow;
pub mod infer;
pub mod inspect;
pub mod job;
pub mod lanes;
pub mod oip;
pub mod payload;
pub mod pipeline;
pub mod reload;
pub mod result;
pub mod settings;
pub mod submit;
pub mod supervisor;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod worker;

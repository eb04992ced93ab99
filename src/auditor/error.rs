//! What can stop an audit command, typed by what the person does next: change the settings,
//! the stream or the user's permissions (a set-up problem), or try again.

use super::database::DatabaseError;
use super::reproduce::ReproduceError;
use crate::amqp::stream::StreamError;
use crate::settings::SettingsError;

/// What can stop an audit command.
#[derive(Debug, thiserror::Error)]
pub enum AuditorError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Reproduce(#[from] ReproduceError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(
        "no record of job {job_id:?} in {stream}; check the job id, the stream (--stream, audit.stream), and that \
         the trail still keeps records that old (audit.max_age)"
    )]
    NoRecordOfJob { job_id: String, stream: String },
}

impl AuditorError {
    /// True when the settings, the stream or the user's permissions must change first.
    pub fn is_setup(&self) -> bool {
        match self {
            AuditorError::Stream(error) => error.is_setup(),
            AuditorError::Output(_) => false,
            AuditorError::Reproduce(error) => error.is_setup(),
            AuditorError::Settings(_) => true,
            AuditorError::Database(error) => error.is_setup(),
            AuditorError::NoRecordOfJob { .. } => true,
        }
    }
}

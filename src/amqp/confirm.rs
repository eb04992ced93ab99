//! What the broker said of one published message: stored, returned as unroutable (mandatory
//! messages to a queue that does not exist), or refused; and the wait for it, bounded by
//! `amqp.confirm_timeout_ms`.

use std::time::Duration;

use lapin::{Confirmation, PublisherConfirm};

use super::AmqpError;

/// What the broker did with one published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    Stored,
    /// Returned as unroutable: the queue it was sent to does not exist.
    Returned,
    Refused,
}

impl From<&Confirmation> for Confirmed {
    fn from(confirmation: &Confirmation) -> Self {
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Confirmed::Stored,
            Confirmation::Ack(Some(_)) => Confirmed::Returned,
            Confirmation::Nack(_) => Confirmed::Refused,
        }
    }
}

/// The broker's confirm of a publish; a confirm that takes longer than `timeout` is an error: the
/// connection is taken for broken.
pub async fn confirmed(confirm: PublisherConfirm, timeout: Duration) -> Result<Confirmation, AmqpError> {
    match tokio::time::timeout(timeout, confirm).await {
        Ok(confirmation) => Ok(confirmation?),
        Err(_) => Err(AmqpError::ConfirmTimeout(timeout.as_millis() as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unroutable_and_refused_confirms_are_told_apart() {
        assert_eq!(Confirmed::from(&Confirmation::Ack(None)), Confirmed::Stored);
        assert_eq!(Confirmed::from(&Confirmation::NotRequested), Confirmed::Stored);
        assert_eq!(Confirmed::from(&Confirmation::Nack(None)), Confirmed::Refused);
    }
}

//! What can go wrong with the broker, typed by what the caller does next: a refusal (the
//! settings must change: exit 2 at start-up) or a failure (reconnect and retry).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error(
        "RabbitMQ at {host}:{port} refused user {user:?} on vhost {vhost:?}: {reason}; check the user, password and \
         vhost in amqp.url (or BATCHSCORE__AMQP__URL, amqp.url_file), the password in amqp.password_file if set, \
         and the user's permissions on the vhost"
    )]
    Refused { user: String, host: String, port: u16, vhost: String, reason: String },
    #[error(
        "RabbitMQ at {host}:{port} refused the certificate login (SASL EXTERNAL) on vhost {vhost:?}: {reason}; the \
         broker needs the rabbitmq_auth_mechanism_ssl plugin, EXTERNAL in its auth_mechanisms, and a user named \
         after the client certificate's subject (ssl_cert_login_from) with permissions on the vhost"
    )]
    RefusedCertificate { host: String, port: u16, vhost: String, reason: String },
    #[error("amqp.url {url} cannot be used: {reason}")]
    Url { url: String, reason: String },
    #[error(
        "amqp.url connects to {host} in plaintext (amqp://), so the broker password and every job would cross the \
         network unencrypted. Use amqps:// (amqp.tls.ca_file names the broker's CA), or, only where the network \
         itself is protected, set amqp.allow_plaintext: true (BATCHSCORE__AMQP__ALLOW_PLAINTEXT=true)"
    )]
    Plaintext { host: String },
    #[error("amqp.url asks for certificate login (auth_mechanism=external), which needs {missing}")]
    CertificateLogin { missing: &'static str },
    #[error("{key} {}: {problem}", path.display())]
    TlsFile { key: &'static str, path: PathBuf, problem: String },
    #[error(
        "amqps:// without amqp.tls.ca_file trusts the system's CA certificates, but none could be loaded ({cause}); \
         set amqp.tls.ca_file to the broker's CA bundle, or install the system's CA certificates (ca-certificates)"
    )]
    NoTrustStore { cause: String },
    #[error("TLS with RabbitMQ at {host}:{port} failed: {cause}")]
    Tls { host: String, port: u16, cause: String },
    #[error("{queue}: {source} (if it exists with other arguments, e.g. as a classic queue, delete it or set amqp.declare_queues: false)")]
    Queue { queue: String, source: lapin::Error },
    #[error(
        "RabbitMQ refused the worker's user access to {queue}: {reason}; {}",
        if *declaring {
            "with amqp.declare_queues: true the worker declares its queues, which needs the configure permission. \
             Where operations declare them (deploy/rabbitmq/definitions.json), set amqp.declare_queues: false \
             (BATCHSCORE__AMQP__DECLARE_QUEUES=false), or grant the user configure permission on them"
        } else {
            "the user needs read permission on the jobs queues and write permission on the default exchange and \
             the dead-letter exchange (deploy/rabbitmq/definitions.json grants exactly those)"
        }
    )]
    AccessRefused { queue: String, reason: String, declaring: bool },
    #[error(
        "audit stream {stream}: {source} (declare it as a stream with the x-max-age and x-max-length-bytes of \
         audit.max_age and audit.max_bytes, or set amqp.declare_queues: true; if it exists with other arguments, \
         delete it or match them; or set audit.enabled: false)"
    )]
    AuditStream { stream: String, source: lapin::Error },
    #[error(
        "the audit stream {stream} does not exist: the records of job {job_id} and the jobs published with it came \
         back unroutable, so those jobs stay unacknowledged and return to their queues. Declare the stream (amqp.declare_queues: true declares it at \
         start-up) or set audit.enabled: false"
    )]
    AuditStreamMissing { stream: String, job_id: String },
    #[error(
        "the broker refused the records of job {job_id} and the jobs published with it on the audit stream \
         {stream}, so those jobs stay unacknowledged and return to their queues; the broker's log says why (a disk alarm, a stream without a \
         leader)"
    )]
    AuditRecordRefused { stream: String, job_id: String },
    #[error(
        "the broker session ended before the audit record of a job was confirmed; the job stays unacknowledged and \
         returns to its queue"
    )]
    AuditUnconfirmed,
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("the broker did not confirm a result or an audit record within {0} ms (amqp.confirm_timeout_ms)")]
    ConfirmTimeout(u64),
    #[error("broker channel failed: {0}")]
    Channel(#[from] lapin::Error),
    #[error("the broker ended the consumer on {0}")]
    ConsumerEnded(String),
    #[error("a result reached the RabbitMQ publisher for a job that did not come from RabbitMQ")]
    ForeignDelivery,
}

impl AmqpError {
    /// True when retrying the same settings cannot succeed: the broker answered and refused the
    /// credentials or the vhost, the TLS handshake failed (an unknown CA, an expired certificate,
    /// a host name the certificate does not cover, a client certificate the broker refused), or
    /// the settings themselves cannot work (the URI, the plaintext rule, a TLS file). A broker
    /// that cannot be reached is not a refusal: it may come back.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            AmqpError::Refused { .. }
                | AmqpError::RefusedCertificate { .. }
                | AmqpError::Url { .. }
                | AmqpError::Plaintext { .. }
                | AmqpError::CertificateLogin { .. }
                | AmqpError::TlsFile { .. }
                | AmqpError::NoTrustStore { .. }
                | AmqpError::Tls { .. }
                | AmqpError::AccessRefused { .. }
        )
    }
}

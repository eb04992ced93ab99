//! Where the worker connects and how: the broker URI held to the transport rules (TLS, or
//! plaintext only on this machine unless `amqp.allow_plaintext`), and the TLS client
//! configuration of `amqp.tls`, read and checked before anything connects, so that a wrong file
//! stops start-up naming the file and the cause. A failed handshake is explained here too.
//!
//! The files are read again for every connection: a certificate renewed in place (a rotated
//! Kubernetes Secret) is used from the next reconnection on.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, RootCertStore};

use super::error::AmqpError;
use crate::settings::{redact, AmqpSettings};

/// A broker URI that passed the transport rules, with the TLS configuration to reach it.
pub struct Endpoint {
    pub(super) uri: AMQPUri,
    /// The URI as it may be shown: without its password.
    pub(super) shown: String,
    /// Holds the client key: never Debug-formatted.
    pub(super) tls: OwnedTLSConfig,
    /// Whom the broker's certificate must chain to, for error messages.
    trust: Trust,
}

/// Where the CA certificates that verify the broker come from.
enum Trust {
    /// `amqp.tls.ca_file`, and nothing else.
    CaFile(PathBuf),
    /// The system's trust store (`amqp.tls.ca_file` is not set).
    System,
    /// A plaintext connection: no certificate is verified.
    None,
}

impl Endpoint {
    /// Parses the URI, applies the transport rules and, for `amqps://`, reads and checks the CA,
    /// certificate and key files. Every error is a set-up problem: retrying cannot help.
    pub fn resolve(settings: &AmqpSettings) -> Result<Self, AmqpError> {
        let shown = redact(&settings.url);
        let unusable = |reason: String| AmqpError::Url { url: shown.clone(), reason };
        // A parser error could quote the URI: only its redacted form may appear.
        let uri: AMQPUri =
            settings.url.parse().map_err(|reason: String| unusable(reason.replace(&settings.url, &shown)))?;
        if authority(&settings.url).contains('[') {
            // amq-protocol-uri keeps only host names and IPv4 addresses; for an IPv6 literal it
            // would silently connect to "localhost" instead.
            return Err(unusable(
                "IPv6 address literals are not supported by the AMQP client; use a host name that resolves to the \
                 address"
                    .into(),
            ));
        }
        let external = uri.query.auth_mechanism == Some(SASLMechanism::External);
        let (tls, trust) = match uri.scheme {
            AMQPScheme::AMQP => {
                if !settings.allow_plaintext && !is_loopback(&uri.authority.host) {
                    return Err(AmqpError::Plaintext { host: uri.authority.host.clone() });
                }
                if external {
                    return Err(AmqpError::CertificateLogin {
                        missing: "an amqps:// URI: certificate login needs TLS with a client certificate",
                    });
                }
                (OwnedTLSConfig::default(), Trust::None)
            }
            AMQPScheme::AMQPS => tls_config(settings)?,
        };
        if external && tls.identity.is_none() {
            return Err(AmqpError::CertificateLogin {
                missing: "amqp.tls.cert_file and amqp.tls.key_file: the client certificate whose subject names the \
                          broker user",
            });
        }
        Ok(Self { uri, shown, tls, trust })
    }

    /// Whether the broker is asked for certificate login (SASL EXTERNAL).
    pub fn certificate_login(&self) -> bool {
        self.uri.query.auth_mechanism == Some(SASLMechanism::External)
    }

    /// The handshake failure behind a connection error, as an [`AmqpError::Tls`]; `None` when the
    /// error is not one of TLS.
    pub fn tls_failure(&self, error: &lapin::Error) -> Option<AmqpError> {
        let lapin::ErrorKind::IOError(io) = error.kind() else { return None };
        let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
        let (host, port) = (self.uri.authority.host.clone(), self.uri.authority.port);
        Some(AmqpError::Tls { host, port, cause: self.explain(tls) })
    }

    /// What a handshake error means, and what fixes it.
    fn explain(&self, error: &rustls::Error) -> String {
        let host = &self.uri.authority.host;
        match error {
            rustls::Error::InvalidCertificate(certificate) => match certificate {
                CertificateError::UnknownIssuer => match &self.trust {
                    Trust::CaFile(path) => format!(
                        "the broker's certificate is not signed by a CA in amqp.tls.ca_file ({}); set amqp.tls.ca_file \
                         to the CA bundle that signed the broker's certificate",
                        path.display()
                    ),
                    _ => "the broker's certificate is not signed by a CA of the system's trust store; set \
                          amqp.tls.ca_file to the CA bundle that signed it"
                        .into(),
                },
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("the broker's certificate has expired ({error}); the broker needs a renewed certificate")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                    "the broker's certificate is not valid yet ({error}); check the clocks of this machine and of \
                     the CA"
                ),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                    "the broker's certificate is not valid for the host name {host:?} of amqp.url ({error}); connect \
                     with a name the certificate lists (its subject alternative names), or have the broker's \
                     certificate issued for {host:?}"
                ),
                _ => format!("the broker's certificate is not acceptable: {error}"),
            },
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure
                    if self.tls.identity.is_none() =>
                {
                    format!(
                        "the broker requires a client certificate (TLS alert {alert:?}); set amqp.tls.cert_file and \
                         amqp.tls.key_file"
                    )
                }
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied => format!(
                    "the broker refused this worker's client certificate (TLS alert {alert:?}); amqp.tls.cert_file \
                     must be valid and signed by a CA the broker trusts (its ssl_options.cacertfile)"
                ),
                _ => format!("the broker ended the handshake with TLS alert {alert:?}; check its ssl_options"),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
                "the broker did not answer in TLS ({error}); is port {} its TLS listener (RabbitMQ's default amqps \
                 port is 5671)?",
                self.uri.authority.port
            ),
            _ => format!("{error}; check amqp.tls and the broker's ssl_options"),
        }
    }
}

/// The authority (`user:password@host:port`) of a URI.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())]
}

/// Loopback: `localhost`, 127.0.0.0/8 and ::1. Plaintext to them never leaves the machine.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The TLS configuration of an `amqps://` connection, from the files of `amqp.tls`, each read and
/// checked: the CA certificates parse, the client certificate and key parse and belong together.
fn tls_config(settings: &AmqpSettings) -> Result<(OwnedTLSConfig, Trust), AmqpError> {
    let tls = &settings.tls;
    let mut roots = RootCertStore::empty();
    let (cert_chain, trust) = match &tls.ca_file {
        Some(path) => {
            let pem = read("amqp.tls.ca_file", path)?;
            for cert in certificates("amqp.tls.ca_file", path, &pem)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error("amqp.tls.ca_file", path, format!("not a CA certificate: {e}")))?;
            }
            (String::from_utf8_lossy(&pem).into_owned(), Trust::CaFile(path.clone()))
        }
        None => {
            let (pem, certs) = system_roots()?;
            roots.add_parsable_certificates(certs);
            (pem, Trust::System)
        }
    };
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_path), Some(key_path)) => {
            let cert_pem = read("amqp.tls.cert_file", cert_path)?;
            let key_pem = read("amqp.tls.key_file", key_path)?;
            let chain = certificates("amqp.tls.cert_file", cert_path, &cert_pem)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                file_error("amqp.tls.key_file", key_path, format!("holds no usable private key in PEM ({e})"))
            })?;
            check_pair(roots, chain, key, cert_path, key_path)?;
            Some(OwnedIdentity::PKCS8 { pem: cert_pem, key: key_pem })
        }
        // Settings validation allows only both or neither.
        _ => None,
    };
    Ok((OwnedTLSConfig { identity, cert_chain: Some(cert_chain) }, trust))
}

/// Builds the rustls client configuration once, as the connection will: rustls refuses a key
/// that is not the certificate's, and a key type it cannot sign with.
fn check_pair(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), AmqpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error("amqp.tls.key_file", key_path, e.to_string()))?
        .with_root_certificates(roots);
    builder.with_client_auth_cert(chain, key).map(drop).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => file_error(
            "amqp.tls.key_file",
            key_path,
            format!("is not the private key of the certificate in amqp.tls.cert_file ({})", cert_path.display()),
        ),
        other => file_error("amqp.tls.key_file", key_path, format!("cannot be used with amqp.tls.cert_file: {other}")),
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, AmqpError> {
    std::fs::read(path).map_err(|e| file_error(key, path, format!("cannot be read: {e}")))
}

/// The certificates of a PEM file; at least one.
fn certificates(key: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, AmqpError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "holds no certificate (no -----BEGIN CERTIFICATE----- block)".into()));
    }
    Ok(certs)
}

fn file_error(key: &'static str, path: &Path, problem: String) -> AmqpError {
    AmqpError::TlsFile { key, path: path.to_path_buf(), problem }
}

/// The system's CA certificates, as PEM for the AMQP client and as DER for the checks here.
fn system_roots() -> Result<(String, Vec<CertificateDer<'static>>), AmqpError> {
    let loaded = rustls_native_certs::load_native_certs();
    if loaded.certs.is_empty() {
        let cause = loaded.errors.first().map_or_else(|| "it is empty".to_string(), ToString::to_string);
        return Err(AmqpError::NoTrustStore { cause });
    }
    let mut pem = String::new();
    for cert in &loaded.certs {
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in encoded.as_bytes().chunks(64) {
            // Base64 is ASCII.
            let _ = writeln!(pem, "{}", String::from_utf8_lossy(line));
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    Ok((pem, loaded.certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> AmqpSettings {
        AmqpSettings { url: url.into(), ..AmqpSettings::default() }
    }

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.10.0.3", "::1", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.255.255.1", "rabbitmq", "localhost.example.com", "128.0.0.1", "::2", ""] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn plaintext_to_another_machine_is_refused_unless_allowed() {
        let remote = settings("amqp://guest:secret@10.255.255.1:5672/%2f");
        let error = Endpoint::resolve(&remote).err().expect("refused");
        assert!(error.is_refusal());
        let message = error.to_string();
        for needle in ["10.255.255.1", "amqps://", "amqp.allow_plaintext: true"] {
            assert!(message.contains(needle), "{needle:?} missing from {message}");
        }
        assert!(!message.contains("secret"), "{message}");
        let allowed = AmqpSettings { allow_plaintext: true, ..remote };
        assert!(Endpoint::resolve(&allowed).is_ok());
        assert!(Endpoint::resolve(&settings("amqp://guest:guest@localhost:5672/%2f")).is_ok());
    }

    #[test]
    fn an_ipv6_literal_is_refused_rather_than_replaced_by_localhost() {
        // What the URI parser does with it: the reason for refusing it.
        let parsed: AMQPUri = "amqp://guest:guest@[::1]:5672/%2f".parse().expect("parses");
        assert_eq!(parsed.authority.host, "localhost");
        let error = Endpoint::resolve(&settings("amqp://guest:secret@[::1]:5672/%2f")).err().expect("refused");
        let message = error.to_string();
        assert!(message.contains("IPv6") && !message.contains("secret"), "{message}");
    }

    #[test]
    fn certificate_login_needs_a_client_certificate() {
        let error =
            Endpoint::resolve(&settings("amqps://localhost:5671/%2f?auth_mechanism=external")).err().expect("refused");
        assert!(error.to_string().contains("amqp.tls.cert_file"), "{error}");
        let error =
            Endpoint::resolve(&settings("amqp://localhost:5672/%2f?auth_mechanism=external")).err().expect("refused");
        assert!(error.to_string().contains("amqps://"), "{error}");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let mut amqps = settings("amqps://guest:guest@localhost:5671/%2f");
        amqps.tls.ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        let error = Endpoint::resolve(&amqps).err().expect("refused");
        assert!(error.is_refusal());
        let message = error.to_string();
        assert!(message.contains("amqp.tls.ca_file") && message.contains("/nonexistent/ca.pem"), "{message}");
    }

    #[test]
    fn a_file_without_certificates_is_named() {
        let path = std::env::temp_dir().join(format!("batchscore-not-a-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").expect("temporary file");
        let mut amqps = settings("amqps://guest:guest@localhost:5671/%2f");
        amqps.tls.ca_file = Some(path.clone());
        let message = Endpoint::resolve(&amqps).err().expect("refused").to_string();
        let _ = std::fs::remove_file(&path);
        assert!(message.contains("holds no certificate"), "{message}");
    }
}

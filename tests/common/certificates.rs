//! Certificates made at test time with rcgen: a certificate authority of the test's own, and the
//! broker and client certificates it signs, written as PEM files (ECDSA P-256 keys, PKCS#8) into
//! a directory the test chooses. Nothing is read from or written to the system's trust store.

use std::fs;
use std::path::{Path, PathBuf};

use super::private_broker::TlsListener;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority whose certificate is `<dir>/<name>-ca.pem`.
pub struct Authority {
    name: String,
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    /// A new CA named `batchscore test CA <name>`, its certificate written to `dir` (created if
    /// needed).
    pub fn new(dir: &Path, name: &str) -> Authority {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("batchscore test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("a CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("a self-signed CA certificate");
        let authority = Authority { name: name.to_string(), dir: dir.to_path_buf(), issuer };
        write(&authority.ca_file(), &authority.issuer.pem());
        authority
    }

    /// The CA certificate (PEM): what a client's `amqp.tls.ca_file` or a broker's
    /// `ssl_options.cacertfile` names.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A server certificate for the DNS names and IP addresses in `names` (its subject
    /// alternative names), written as `<stem>.pem` and `<stem>.key`.
    pub fn server(&self, stem: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("valid subject alternative names");
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(stem, params)
    }

    /// A TLS listener for a broker node on this machine: a server certificate for `localhost`
    /// (`server.pem`, `server.key`) from this CA, which also signs the client certificates the
    /// listener accepts.
    pub fn listener(&self, require_client_certificate: bool) -> TlsListener {
        let server = self.server("server", &["localhost"]);
        TlsListener {
            cert_file: server.cert,
            key_file: server.key,
            client_ca_file: self.ca_file(),
            require_client_certificate,
        }
    }

    /// A server certificate like [`Authority::server`]'s, valid only in the year 2000.
    pub fn expired_server(&self, stem: &str, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("valid subject alternative names");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.issue(stem, params)
    }

    /// A client certificate whose subject's common name is `common_name` (the broker user of a
    /// certificate login), written as `<stem>.pem` and `<stem>.key`.
    pub fn client(&self, stem: &str, common_name: &str) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(stem, params)
    }

    fn issue(&self, stem: &str, mut params: CertificateParams) -> Issued {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("a certificate signed by the CA");
        let issued = Issued { cert: self.dir.join(format!("{stem}.pem")), key: self.dir.join(format!("{stem}.key")) };
        write(&issued.cert, &cert.pem());
        write(&issued.key, &key.serialize_pem());
        issued
    }
}

fn write(path: &Path, pem: &str) {
    fs::write(path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

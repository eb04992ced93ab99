//! TLS to the broker, certificate login, the plaintext rule and secrets from files. The broker is
//! a private RabbitMQ node with a TLS listener (`common::private_broker`), booted once for every
//! test of this file, with certificates made at test time (`common::certificates`): a CA that
//! signs the broker's certificate (for `localhost` only, so that `127.0.0.1` is a host name it
//! does not cover) and the worker's client certificate, and a stranger CA that neither side
//! trusts. Workers that must refuse to start run as processes, whose exit code is checked.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use batchscore::settings::Settings;
use common::certificates::{Authority, Issued};
use common::private_broker::{self, BrokerOptions, PrivateBroker};
use common::{expected, fixtures_repository, run_bounded, Client, TestWorker, WorkerProcess};
use serde_json::json;

/// Longest a worker expected to refuse start-up may run: loading the fixture models takes a few
/// seconds on a busy machine, and the refusal of a handshake comes after them.
const START_UP_PATIENCE: Duration = Duration::from_secs(120);

/// The broker user of the worker's client certificate (its common name).
const CERTIFICATE_USER: &str = "cert-scorer";

/// The node every test here shares, and the files its clients use.
struct Node {
    broker: PrivateBroker,
    /// CA and certificates, under the node's directory.
    pki: PathBuf,
    /// Password users, each used by one test: (name, password).
    users: Vec<(&'static str, String)>,
}

impl Node {
    /// The CA that signed the broker's and the worker's certificates.
    fn ca_file(&self) -> PathBuf {
        self.pki.join("trusted-ca.pem")
    }

    /// A CA that signed neither.
    fn stranger_ca_file(&self) -> PathBuf {
        self.pki.join("stranger-ca.pem")
    }

    /// The worker's client certificate, whose common name is [`CERTIFICATE_USER`].
    fn worker_certificate(&self) -> Issued {
        Issued { cert: self.pki.join("worker.pem"), key: self.pki.join("worker.key") }
    }

    /// A client certificate with the same common name, from the stranger CA.
    fn stranger_certificate(&self) -> Issued {
        Issued { cert: self.pki.join("stranger.pem"), key: self.pki.join("stranger.key") }
    }

    fn password(&self, user: &str) -> &str {
        self.users.iter().find(|(name, _)| *name == user).map(|(_, password)| password.as_str()).expect("a known user")
    }
}

/// The shared node, booted by the first test that needs it.
fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    private_broker::shared(&NODE, boot)
}

async fn boot() -> Node {
    let made = std::env::temp_dir().join(format!("batchscore-pki-{}", uuid::Uuid::new_v4().simple()));
    let trusted = Authority::new(&made, "trusted");
    let stranger = Authority::new(&made, "stranger");
    trusted.client("worker", CERTIFICATE_USER);
    stranger.client("stranger", CERTIFICATE_USER);
    let tls = trusted.listener(false);
    let broker = PrivateBroker::start_with(BrokerOptions { tls: Some(tls) }).await;
    let pki = broker.keep(&made, "pki");
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let users: Vec<(&'static str, String)> = ["ca-scorer", "file-scorer", "pw-scorer"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| (name, format!("Pw{i}-{}", &unique[..16])))
        .collect();
    for (name, password) in &users {
        broker.add_user(name, password).await;
    }
    // A certificate login never uses this password.
    broker.add_user(CERTIFICATE_USER, &unique).await;
    Node { broker, pki, users }
}

/// `batchscore worker` on the test's queues and the fixture models, with `env` on top; the
/// settings file names no broker and an inherited BATCHSCORE__AMQP__URL is dropped.
fn worker_command(settings: &Settings, metrics_listen: &str, env: &[(&str, String)]) -> Command {
    let mut command = common::worker_command(settings, metrics_listen);
    command.env_remove("BATCHSCORE__AMQP__URL");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Runs a worker expected to refuse start-up; returns its output once it exited on its own.
fn worker_expected_to_exit(test: &str, env: &[(&str, String)]) -> Output {
    let settings = common::settings(test, &fixtures_repository());
    run_bounded(worker_command(&settings, "127.0.0.1:0", env), START_UP_PATIENCE)
        .unwrap_or_else(|error| panic!("batchscore worker: {error}"))
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exit 2, with every needle in its message, and no panic.
fn assert_exit_2_saying(output: &Output, needles: &[&str]) -> String {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    assert!(!text.contains("panicked"), "{text}");
    text
}

fn path(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// Scores one job of `linear` v1 through a worker whose queues are `settings`', sent over the
/// node's plaintext listener, and checks its scores.
async fn score_one_job(settings: &Settings) {
    let mut client = Client::at(&node().broker.url(), settings).await;
    let fixture = expected("linear_v1");
    client
        .send(&json!({"job_id": "tls-1", "model": "linear", "model_version": "1", "rows": [fixture["rows"][0]]}))
        .await;
    let result = client.result().await;
    assert_eq!(result["status"], "ok", "{result}");
    common::assert_close(
        &result["outputs"]["probabilities"][0],
        &fixture["outputs"]["probabilities"][0],
        "probabilities[0]",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_scores_over_amqps_verifying_the_broker_against_ca_file() {
    let node = node();
    let mut settings = common::settings("tls-ca", &fixtures_repository());
    let user = "ca-scorer";
    settings.amqp.url = node.broker.amqps_url(&format!("{user}:{}", node.password(user)), "localhost", "");
    settings.amqp.tls.ca_file = Some(node.ca_file());
    let worker = TestWorker::start(settings.clone()).await;
    node.broker.wait_for_connection(user, "PLAIN", true).await;
    score_one_job(&settings).await;
    assert_eq!(worker.stop_via(&node.broker.url()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_login_scores_as_the_user_the_certificate_names() {
    let node = node();
    let mut settings = common::settings("tls-external", &fixtures_repository());
    settings.amqp.url = node.broker.amqps_url("", "localhost", "?auth_mechanism=external");
    let certificate = node.worker_certificate();
    settings.amqp.tls.ca_file = Some(node.ca_file());
    settings.amqp.tls.cert_file = Some(certificate.cert);
    settings.amqp.tls.key_file = Some(certificate.key);
    let worker = TestWorker::start(settings.clone()).await;
    // Logged in by the certificate, not as the URI's default user (guest, which loopback allows).
    node.broker.wait_for_connection(CERTIFICATE_USER, "EXTERNAL", true).await;
    score_one_job(&settings).await;
    assert_eq!(worker.stop_via(&node.broker.url()).await, 0);
}

#[test]
fn a_broker_certificate_from_an_unknown_ca_exits_2_naming_ca_file() {
    let node = node();
    let user = "ca-scorer";
    let ca_file = node.stranger_ca_file();
    let output = worker_expected_to_exit(
        "tls-unknown-ca",
        &[
            (
                "BATCHSCORE__AMQP__URL",
                node.broker.amqps_url(&format!("{user}:{}", node.password(user)), "localhost", ""),
            ),
            ("BATCHSCORE__AMQP__TLS__CA_FILE", path(&ca_file)),
        ],
    );
    let text =
        assert_exit_2_saying(&output, &["TLS with RabbitMQ at localhost", "not signed by a CA in amqp.tls.ca_file"]);
    assert!(text.contains(&path(&ca_file)), "the file is named:\n{text}");
    assert!(!text.contains("retrying"), "a refused certificate is not retried:\n{text}");
    assert!(!text.contains(node.password(user)), "the password leaked:\n{text}");
}

/// A TLS listener of the test's own that presents `certificate` and drops each connection after
/// the handshake (the shared node's certificate cannot change while other tests use it). Returns
/// its port; it listens until the test process exits.
fn tls_listener(certificate: &Issued) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(&certificate.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .expect("the certificate file");
    let key = PrivateKeyDer::from_pem_file(&certificate.key).expect("the key file");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("a server configuration");
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("a bound listener has an address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let Ok(connection) = rustls::ServerConnection::new(Arc::clone(&config)) else { continue };
            // Reading drives the handshake, which ends when the client refuses the certificate.
            let _ = std::io::Read::read(&mut rustls::StreamOwned::new(connection, stream), &mut [0u8; 1]);
        }
    });
    port
}

#[test]
fn an_expired_broker_certificate_exits_2() {
    let authority = Authority::new(&node().pki.join("expired"), "expiring");
    let port = tls_listener(&authority.expired_server("expired-server", &["localhost"]));
    let output = worker_expected_to_exit(
        "tls-expired",
        &[
            ("BATCHSCORE__AMQP__URL", format!("amqps://guest:guest@localhost:{port}/%2f")),
            ("BATCHSCORE__AMQP__TLS__CA_FILE", path(&authority.ca_file())),
        ],
    );
    let text =
        assert_exit_2_saying(&output, &[&format!("TLS with RabbitMQ at localhost:{port}"), "certificate has expired"]);
    assert!(!text.contains("retrying"), "an expired certificate is not retried:\n{text}");
}

#[test]
fn a_host_name_the_broker_certificate_does_not_name_exits_2() {
    let node = node();
    let user = "ca-scorer";
    // The broker's certificate names localhost only; 127.0.0.1 reaches the same listener.
    let output = worker_expected_to_exit(
        "tls-wrong-host",
        &[
            (
                "BATCHSCORE__AMQP__URL",
                node.broker.amqps_url(&format!("{user}:{}", node.password(user)), "127.0.0.1", ""),
            ),
            ("BATCHSCORE__AMQP__TLS__CA_FILE", path(&node.ca_file())),
        ],
    );
    let text = assert_exit_2_saying(&output, &["not valid for the host name \"127.0.0.1\""]);
    assert!(!text.contains("retrying"), "a refused certificate is not retried:\n{text}");
}

/// In TLS 1.3 the broker judges the client's certificate after the client finished its side of
/// the handshake: its alert can reach the worker, or be lost to the reset of a connection the
/// broker closed while the worker was already writing. A reset is retried (a broker restarting
/// resets connections too); the first alert that arrives stops the worker with exit 2.
#[test]
fn a_client_certificate_the_broker_does_not_trust_exits_2() {
    let node = node();
    let certificate = node.stranger_certificate();
    let output = worker_expected_to_exit(
        "tls-untrusted-client",
        &[
            ("BATCHSCORE__AMQP__URL", node.broker.amqps_url("", "localhost", "?auth_mechanism=external")),
            ("BATCHSCORE__AMQP__TLS__CA_FILE", path(&node.ca_file())),
            ("BATCHSCORE__AMQP__TLS__CERT_FILE", path(&certificate.cert)),
            ("BATCHSCORE__AMQP__TLS__KEY_FILE", path(&certificate.key)),
            ("BATCHSCORE__AMQP__RECONNECT_MAX_BACKOFF_MS", "200".to_string()),
        ],
    );
    assert_exit_2_saying(
        &output,
        &["refused this worker's client certificate (TLS alert UnknownCA)", "amqp.tls.cert_file"],
    );
}

#[test]
fn a_key_that_is_not_the_certificates_exits_2_before_models_load() {
    let node = node();
    let (certificate, other) = (node.worker_certificate(), node.stranger_certificate());
    let output = worker_expected_to_exit(
        "tls-key-mismatch",
        &[
            ("BATCHSCORE__AMQP__URL", node.broker.amqps_url("", "localhost", "?auth_mechanism=external")),
            ("BATCHSCORE__AMQP__TLS__CA_FILE", path(&node.ca_file())),
            ("BATCHSCORE__AMQP__TLS__CERT_FILE", path(&certificate.cert)),
            ("BATCHSCORE__AMQP__TLS__KEY_FILE", path(&other.key)),
        ],
    );
    let text = assert_exit_2_saying(&output, &["amqp.tls.key_file", &path(&other.key), "is not the private key"]);
    assert!(!text.contains("model loaded"), "checked before the models load:\n{text}");
}

#[test]
fn a_missing_ca_file_exits_2_naming_it() {
    let node = node();
    let missing = node.pki.join("absent-ca.pem");
    let output = worker_expected_to_exit(
        "tls-missing-ca",
        &[
            ("BATCHSCORE__AMQP__URL", node.broker.amqps_url("", "localhost", "?auth_mechanism=external")),
            ("BATCHSCORE__AMQP__TLS__CA_FILE", path(&missing)),
        ],
    );
    let text = assert_exit_2_saying(&output, &["amqp.tls.ca_file", &path(&missing), "No such file"]);
    assert!(!text.contains("model loaded"), "checked before the models load:\n{text}");
}

/// No broker is needed: the rule stops the worker before it loads models or connects.
#[test]
fn plaintext_to_another_machine_exits_2_before_connecting() {
    let output = worker_expected_to_exit(
        "plaintext-refused",
        &[("BATCHSCORE__AMQP__URL", "amqp://guest:guest@10.255.255.1:5672/%2f".to_string())],
    );
    let text = assert_exit_2_saying(&output, &["10.255.255.1", "amqps://", "amqp.allow_plaintext: true"]);
    assert!(!text.contains("model loaded") && !text.contains("retrying"), "it tried nothing:\n{text}");
}

/// `0.0.0.0` is no loopback address, so the rule applies to it; Linux connects it to this machine,
/// where port 1 refuses at once: the first retry line comes without waiting on a network timeout.
#[test]
fn allow_plaintext_lets_the_worker_try_a_broker_on_another_machine() {
    let settings = common::settings("plaintext-allowed", &fixtures_repository());
    let mut command = worker_command(
        &settings,
        "127.0.0.1:0",
        &[
            ("BATCHSCORE__AMQP__URL", "amqp://guest:guest@0.0.0.0:1/%2f".to_string()),
            ("BATCHSCORE__AMQP__ALLOW_PLAINTEXT", "true".to_string()),
            ("BATCHSCORE__AMQP__RECONNECT_MAX_BACKOFF_MS", "200".to_string()),
        ],
    );
    let mut child = WorkerProcess(
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("starts"),
    );
    let stderr = child.0.stderr.take().expect("stderr piped");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + START_UP_PATIENCE;
    let mut seen = Vec::new();
    let retry = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            panic!("no retry line within {START_UP_PATIENCE:?}:\n{}", seen.join("\n"));
        };
        if line.contains("no broker session; retrying") {
            break line;
        }
        seen.push(line);
    };
    assert!(retry.contains("0.0.0.0:1"), "the line names the broker: {retry}");
    assert!(child.0.try_wait().expect("worker status").is_none(), "the worker keeps trying");
}

/// One run refused (a wrong password in the file: exit 2) and one working run, logging at debug,
/// scored and scraped: neither password appears in anything they print, nor does the password
/// of the working run in its /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_logs_the_worker_in_and_the_password_is_never_printed() {
    let node = node();
    let user = "pw-scorer";
    let (password, wrong) = (node.password(user).to_string(), format!("Not-{}", node.password(user)));
    let secrets = node.broker.dir().join(format!("secrets-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&secrets).expect("secrets directory");
    let (right_file, wrong_file) = (secrets.join("password"), secrets.join("wrong-password"));
    std::fs::write(&right_file, format!("{password}\n")).expect("password file");
    std::fs::write(&wrong_file, format!("{wrong}\n")).expect("password file");
    // The URI names the user only; its port is the node's plaintext (loopback) listener.
    let url = node.broker.url().replace("guest:guest@", &format!("{user}@"));
    let mut printed = Vec::new();

    let refused = worker_expected_to_exit(
        "password-file-refused",
        &[("BATCHSCORE__AMQP__URL", url.clone()), ("BATCHSCORE__AMQP__PASSWORD_FILE", path(&wrong_file))],
    );
    assert_exit_2_saying(&refused, &[&format!("refused user \"{user}\""), "ACCESS_REFUSED"]);
    printed.push(("refused run", String::from_utf8_lossy(&refused.stdout).into_owned() + &stderr(&refused)));

    let settings = common::settings("password-file", &fixtures_repository());
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().expect("an address");
    let log = secrets.join("worker.log");
    let mut command = worker_command(
        &settings,
        &metrics.to_string(),
        &[
            ("BATCHSCORE__AMQP__URL", url.clone()),
            ("BATCHSCORE__AMQP__PASSWORD_FILE", path(&right_file)),
            ("BATCHSCORE__LOGGING__LEVEL", "debug".to_string()),
        ],
    );
    let log_file = std::fs::File::create(&log).expect("log file");
    let mut worker = WorkerProcess(
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("starts"),
    );
    common::wait_until_ready(metrics, START_UP_PATIENCE).await;
    node.broker.wait_for_connection(user, "PLAIN", false).await;
    score_one_job(&settings).await;
    // The job counts as completed once acknowledged, a moment after its result arrived.
    let started = Instant::now();
    let scrape = loop {
        let (status, scrape) = common::get(metrics, "/metrics").expect("a scrape");
        assert_eq!(status, 200);
        if common::sample(&scrape, "batchscore_jobs_completed_total", &[("status", "ok")]) >= 1.0 {
            break scrape;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the scored job was not counted:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    printed.push(("/metrics", scrape));
    let status = worker.terminate().await;
    assert!(status.success(), "{status}");
    let logged = std::fs::read_to_string(&log).expect("the worker's log");
    // At debug level the worker prints its settings, the broker URI among them.
    let shown = format!("url: \"{}\"", url.replace(&format!("{user}@"), &format!("{user}:***@")));
    assert!(logged.contains("DEBUG") && logged.contains(&shown), "{shown} missing from:\n{logged}");
    printed.push(("working run", logged));

    for args in [&["--help"][..], &["worker", "--help"], &["submit", "--help"]] {
        let mut help = Command::new(env!("CARGO_BIN_EXE_batchscore"));
        help.args(args).env("BATCHSCORE__AMQP__URL", &url).env("BATCHSCORE__AMQP__PASSWORD_FILE", &right_file);
        let output = run_bounded(help, Duration::from_secs(60)).expect("--help runs");
        assert!(output.status.success(), "{args:?}");
        printed.push(("--help", String::from_utf8_lossy(&output.stdout).into_owned()));
    }
    for (what, text) in &printed {
        for secret in [&password, &wrong] {
            assert!(!text.contains(secret.as_str()), "{what} printed a password:\n{text}");
        }
    }
    common::delete_topology_at(&node.broker.url(), &settings).await;
}

/// The whole URI from a file, TLS included, for `worker` and `submit` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_file_gives_worker_and_submit_their_broker() {
    let node = node();
    let user = "file-scorer";
    let secrets = node.broker.dir().join(format!("secrets-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&secrets).expect("secrets directory");
    let url_file = secrets.join("url");
    let url = node.broker.amqps_url(&format!("{user}:{}", node.password(user)), "localhost", "");
    std::fs::write(&url_file, format!("{url}\n")).expect("URI file");
    let settings = common::settings("url-file", &fixtures_repository());
    let env = [
        ("BATCHSCORE__AMQP__URL_FILE", path(&url_file)),
        ("BATCHSCORE__AMQP__TLS__CA_FILE", path(&node.ca_file())),
        ("BATCHSCORE__AMQP__JOBS_QUEUE", settings.amqp.jobs_queue.clone()),
    ];
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().expect("an address");
    let mut command = worker_command(&settings, &metrics.to_string(), &env);
    let _worker = WorkerProcess(
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("starts"),
    );
    common::wait_until_ready(metrics, START_UP_PATIENCE).await;
    node.broker.wait_for_connection(user, "PLAIN", true).await;

    let fixture = expected("linear_v1");
    let names: Vec<&str> = fixture["feature_names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    let rows: Vec<String> = fixture["rows"].as_array().unwrap()[..3]
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","))
        .collect();
    let (input, output) = (secrets.join("rows.csv"), secrets.join("scores.jsonl"));
    std::fs::write(&input, format!("{}\n{}\n", names.join(","), rows.join("\n"))).expect("input");
    let mut submit = Command::new(env!("CARGO_BIN_EXE_batchscore"));
    submit
        .args(["submit", "--model", "linear", "--model-version", "1", "--timeout-s", "120", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .current_dir(common::root())
        .env_remove("BATCHSCORE__AMQP__URL")
        .env_remove("RUST_LOG");
    for (key, value) in &env {
        submit.env(key, value);
    }
    let submitted = tokio::task::spawn_blocking(move || run_bounded(submit, Duration::from_secs(180)))
        .await
        .expect("submit ran")
        .expect("submit finished");
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    let lines = std::fs::read_to_string(&output).expect("scores written");
    assert_eq!(lines.lines().count(), 3, "{lines}");
    common::delete_topology_at(&node.broker.url(), &settings).await;
}

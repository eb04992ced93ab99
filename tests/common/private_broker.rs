//! A RabbitMQ node of the test's own, for fault tests that stop or restart a broker: it runs on
//! free ports with its own node name, data, log and config files under a temporary directory, and
//! is stopped and removed when dropped. The shared broker on 127.0.0.1:5672 is never touched:
//! every `rabbitmqctl` call names this node with `-n`.
//!
//! `PrivateBroker::start_with(BrokerOptions { tls: Some(..) })` adds a TLS listener on loopback
//! (`amqps_url`) with the certificate, key and client CA the test made (`common::certificates`):
//! the broker verifies a client certificate when one is sent (`ssl_options.verify = verify_peer`),
//! refuses clients without one only when asked, and offers certificate login (SASL EXTERNAL, the
//! `rabbitmq_auth_mechanism_ssl` plugin, the user named by the certificate's common name) next to
//! PLAIN. The files are copied into the node's directory, which user `rabbitmq` can read. Users
//! are added on this node only: `add_user`.
//!
//! `PrivateBroker::start_deployed(deploy/rabbitmq, ..)` boots a node from a deployment's own files
//! instead (its `rabbitmq.conf`, `enabled_plugins` and definitions), moved only to this machine's
//! paths and free ports: no plaintext listener and no guest unless those files have them.
//!
//! The node is started through the Debian wrapper (`rabbitmq-server`, which runs it as user
//! `rabbitmq`), so the test must run as root or as `rabbitmq`, and `rabbitmqctl` reaches it with
//! the `rabbitmq` user's Erlang cookie. Each node picks its own name and ports, so a cluster is
//! several `PrivateBroker`s joined with `rabbitmqctl(&["stop_app"])`,
//! `rabbitmqctl(&["join_cluster", first.node()])`, `rabbitmqctl(&["start_app"])`.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

use super::run_bounded;

/// Longest a node may take to boot. A cold boot takes 15-20 s on a busy 2-core machine.
const BOOT_PATIENCE: Duration = Duration::from_secs(120);

/// Longest one `rabbitmqctl` command may run (`start_app` plus `await_startup` included).
const CTL_PATIENCE: Duration = Duration::from_secs(120);

/// Longest the orderly `rabbitmqctl stop` may take before the node is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(60);

/// Boot attempts; a new attempt only follows a port clash (another process took a port between
/// choosing it and the node binding it).
const ATTEMPTS: usize = 3;

/// Ports a node must not take: the shared node's AMQP and distribution ports, epmd, and the range
/// `rabbitmqctl` binds for its own distribution (`RABBITMQ_CTL_DIST_PORT_MIN`..`+10`).
fn reserved(port: u16) -> bool {
    matches!(port, 4369 | 5672 | 25672 | 35672..=35682)
}

/// Kills the node if the test process dies without dropping its `PrivateBroker` (killed, or
/// interrupted: the node runs in its own session, so Ctrl-C does not reach it). It waits for its
/// stdin to close, which happens when the test process exits; a normal drop kills it first.
const WATCHDOG: &str = r#"
trap '' INT TERM HUP
read -r _ || true
dir=$1
for _ in $(seq 1 60); do [ -s "$dir/pid" ] && break; sleep 0.5; done
pid=$(cat "$dir/pid" 2>/dev/null || true)
if [ -n "$pid" ] && grep -q beam "/proc/$pid/comm" 2>/dev/null; then kill -KILL "$pid"; fi
rm -rf "$dir"
"#;

/// A node (and what the tests know of it) shared by every test of a binary: made by `boot` for
/// the first test that asks, on a thread and runtime of its own (the asking test's runtime cannot
/// block on it). It is never dropped: the node's watchdog stops it and removes its directory when
/// the test process exits.
pub fn shared<T, F>(cell: &'static OnceLock<T>, boot: fn() -> F) -> &'static T
where
    T: Send + Sync + 'static,
    F: Future<Output = T> + 'static,
{
    cell.get_or_init(|| {
        let booted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(boot())
        });
        booted.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// What a node offers besides its plaintext AMQP listener.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    pub tls: Option<TlsListener>,
}

/// A TLS listener's files (PEM) and how it treats client certificates.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// The broker's certificate and its key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA a client certificate must be signed by (`ssl_options.cacertfile`).
    pub client_ca_file: PathBuf,
    /// Refuse clients that send no certificate (`ssl_options.fail_if_no_peer_cert`).
    pub require_client_certificate: bool,
}

/// How a node is configured.
enum Setup<'a> {
    /// The harness's own configuration: a plaintext listener, guest, and what the options add.
    Harness(&'a BrokerOptions),
    /// A deployment's files (`PrivateBroker::start_deployed`).
    Deployed { deployment: &'a Path, tls: &'a TlsListener },
}

/// One private RabbitMQ node; `url()` is its AMQP URL (guest/guest, loopback only).
pub struct PrivateBroker {
    node: String,
    /// The plaintext listener's port; none on a node booted from a deployment that has none.
    amqp_port: Option<u16>,
    /// The TLS listener's port, when the node has one.
    tls_port: Option<u16>,
    dir: PathBuf,
    /// The `rabbitmq-server` wrapper; the Erlang VM runs below it, in another session.
    server: Child,
    watchdog: Child,
    /// Held open until drop: the watchdog acts when it closes.
    _watchdog_stdin: ChildStdin,
}

/// Why a boot attempt failed.
enum BootFailure {
    /// A port was taken by someone else: try again with other ports.
    PortClash,
    Fatal(String),
}

impl PrivateBroker {
    /// Starts a node and waits until it accepts AMQP connections.
    pub async fn start() -> PrivateBroker {
        Self::start_with(BrokerOptions::default()).await
    }

    /// Starts a node with `options` and waits until it accepts AMQP connections, on its TLS
    /// listener too when it has one.
    pub async fn start_with(options: BrokerOptions) -> PrivateBroker {
        Self::boot(Setup::Harness(&options)).await
    }

    /// Starts a node from the files of `deployment` (a directory like `deploy/rabbitmq`): its
    /// `rabbitmq.conf` and `enabled_plugins` as written, and the definitions file the
    /// configuration loads, so that a test proves what is shipped rather than a copy. Only where
    /// things are on this machine changes: paths under `/etc/rabbitmq/` point into the node's
    /// directory, where the definitions file (from `deployment`) and `tls`'s files (for the
    /// `ssl_options` certfile, keyfile and cacertfile) are copied; the TLS listener moves to a free
    /// loopback port, and so does the Prometheus plugin's listener when it is enabled. Nothing is
    /// added: with the shipped files the node has no plaintext listener (`url()` panics) and no
    /// guest, and clients log in as the users of the definitions. `tls.require_client_certificate`
    /// must agree with the configuration's `ssl_options.fail_if_no_peer_cert`. Returns once the
    /// node has booted, its definitions imported, and its TLS listener accepts connections.
    pub async fn start_deployed(deployment: &Path, tls: &TlsListener) -> PrivateBroker {
        Self::boot(Setup::Deployed { deployment, tls }).await
    }

    async fn boot(setup: Setup<'_>) -> PrivateBroker {
        for _ in 0..ATTEMPTS {
            let mut broker = Self::spawn(&setup).unwrap_or_else(|error| panic!("{error}"));
            match broker.wait_until_booted().await {
                Ok(()) => return broker,
                Err(BootFailure::PortClash) => continue,
                Err(BootFailure::Fatal(error)) => panic!("{error}"),
            }
        }
        panic!("a private RabbitMQ node lost its ports to other processes {ATTEMPTS} times in a row");
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`. Panics when the node has no plaintext listener.
    pub fn url(&self) -> String {
        self.url_as("guest", "guest")
    }

    /// `amqp://<user>:<password>@127.0.0.1:<port>/%2f`: the plaintext listener, as another user
    /// ([`PrivateBroker::add_user`]).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let port = self.amqp_port.expect("the node has a plaintext listener (not one of start_deployed's)");
        format!("amqp://{user}:{password}@127.0.0.1:{port}/%2f")
    }

    /// `amqps://<userinfo>@<host>:<TLS port>/%2f<query>`: `userinfo` may be empty (certificate
    /// login), `query` is empty or starts with `?`. Panics when the node has no TLS listener.
    pub fn amqps_url(&self, userinfo: &str, host: &str, query: &str) -> String {
        self.amqps_url_to("%2f", userinfo, host, query)
    }

    /// [`PrivateBroker::amqps_url`] for vhost `vhost` (percent-encoded: `%2f` for `/`).
    pub fn amqps_url_to(&self, vhost: &str, userinfo: &str, host: &str, query: &str) -> String {
        let port = self.tls_port.expect("the node was started with a TLS listener (BrokerOptions::tls)");
        let userinfo = if userinfo.is_empty() { String::new() } else { format!("{userinfo}@") };
        format!("amqps://{userinfo}{host}:{port}/{vhost}{query}")
    }

    /// Adds user `name` with `password` and every permission on vhost `/`, on this node only.
    pub async fn add_user(&self, name: &str, password: &str) {
        self.rabbitmqctl(&["add_user", name, password]).await;
        self.rabbitmqctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]).await;
    }

    /// The users, login mechanisms and TLS flags of the node's connections.
    pub async fn connections(&self) -> Vec<(String, String, bool)> {
        let listed =
            self.rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "user", "auth_mechanism", "ssl"]).await;
        listed
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('\t');
                Some((fields.next()?.to_string(), fields.next()?.to_string(), fields.next()? == "true"))
            })
            .collect()
    }

    /// Waits (30 s at most) until the node has a connection of `user` logged in with `mechanism`
    /// (`PLAIN`, `EXTERNAL`), over TLS when `ssl`.
    pub async fn wait_for_connection(&self, user: &str, mechanism: &str, ssl: bool) {
        let started = Instant::now();
        loop {
            let connections = self.connections().await;
            if connections.iter().any(|(u, m, s)| u == user && m == mechanism && *s == ssl) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no connection of {user} with {mechanism}, ssl {ssl}: {connections:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node's directory: files a test puts here go with the node (when it is dropped, or by
    /// its watchdog when the test process exits).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves `folder` (made before the node, e.g. its certificates) into the node's directory as
    /// `<dir>/<name>`, so that it goes with the node; returns its new path.
    pub fn keep(&self, folder: &Path, name: &str) -> PathBuf {
        let kept = self.dir.join(name);
        std::fs::rename(folder, &kept)
            .unwrap_or_else(|e| panic!("moving {} next to the node as {}: {e}", folder.display(), kept.display()));
        kept
    }

    /// The Erlang node name, `batchscore-test-<id>@localhost`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Stops the RabbitMQ application (the Erlang node stays up): connections close, the AMQP
    /// port closes, queues keep their messages.
    pub async fn stop_app(&self) {
        self.rabbitmqctl(&["stop_app"]).await;
    }

    /// Starts the application again and returns once it has fully booted.
    pub async fn start_app(&self) {
        self.rabbitmqctl(&["start_app"]).await;
        self.rabbitmqctl(&["await_startup", "--timeout", "60"]).await;
    }

    /// Runs `rabbitmqctl -n <this node> <args>` and returns its standard output; panics with its
    /// output when it fails or runs longer than `CTL_PATIENCE`.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> String {
        let command = ctl_command(&self.node, args);
        let shown = format!("rabbitmqctl -n {} {}", self.node, args.join(" "));
        let output = tokio::task::spawn_blocking(move || run_bounded(command, CTL_PATIENCE))
            .await
            .expect("the rabbitmqctl thread does not panic");
        match output {
            Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).into_owned(),
            Ok(output) => panic!(
                "`{shown}` failed ({}): {}{}; node log: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.dir.join("log").display()
            ),
            Err(error) => panic!("`{shown}` {error}; install RabbitMQ (scripts/setup.sh) so that it is on PATH"),
        }
    }

    /// Prepares a directory, starts the node and its watchdog; does not wait for the boot.
    fn spawn(setup: &Setup) -> Result<PrivateBroker, String> {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let node = format!("batchscore-test-{id}@localhost");
        let dir = std::env::temp_dir().join(format!("batchscore-broker-{id}"));
        let (amqp_port, dist_port, tls_port) = match setup {
            Setup::Harness(options) => {
                let ports = free_ports(if options.tls.is_some() { 3 } else { 2 });
                let (amqp_port, dist_port, tls_port) = (ports[0], ports[1], ports.get(2).copied());
                prepare_directory(&dir, amqp_port, options.tls.as_ref().zip(tls_port))?;
                (Some(amqp_port), dist_port, tls_port)
            }
            Setup::Deployed { deployment, tls } => {
                let [dist_port, tls_port, prometheus_port] = free_ports(3)[..] else { unreachable!("three ports") };
                prepare_deployed_directory(&dir, deployment, tls, tls_port, prometheus_port)?;
                (None, dist_port, Some(tls_port))
            }
        };

        let console = fs::File::create(dir.join("console.log")).and_then(|file| Ok((file.try_clone()?, file)));
        let (console, console_err) = console.map_err(|e| {
            let _ = fs::remove_dir_all(&dir);
            format!("creating {}: {e}", dir.join("console.log").display())
        })?;
        let mut server = Command::new("rabbitmq-server");
        // Inherited RABBITMQ_* variables could point the node at the shared node's files.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RABBITMQ_") {
                server.env_remove(name);
            }
        }
        if let Some(port) = amqp_port {
            server.env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1").env("RABBITMQ_NODE_PORT", port.to_string());
        }
        server
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            // The Debian wrapper runs the node from the shared node's home: a failed boot would
            // leave its crash dump there.
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            // Instead of /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            // What the shared env file sets too: epmd and distribution on loopback only.
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err);
        let mut server = server.spawn().map_err(|e| {
            let _ = fs::remove_dir_all(&dir);
            format!("cannot run rabbitmq-server ({e}): install RabbitMQ (scripts/setup.sh) so that it is on PATH")
        })?;

        let watchdog = Command::new("sh")
            .args(["-c", WATCHDOG, "sh"])
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut watchdog = match watchdog {
            Ok(watchdog) => watchdog,
            Err(e) => {
                // Without the watchdog the node would be stopped by nobody: stop it here.
                stop_node(&node, &dir, &mut server);
                let _ = fs::remove_dir_all(&dir);
                return Err(format!("cannot run sh for the private node's watchdog: {e}"));
            }
        };
        let watchdog_stdin = watchdog.stdin.take().expect("stdin was piped just above");
        Ok(PrivateBroker { node, amqp_port, tls_port, dir, server, watchdog, _watchdog_stdin: watchdog_stdin })
    }

    /// Waits until the node's AMQP port (its TLS port when it has no plaintext one) answers, the
    /// node reports a finished boot, and guest can open an AMQP connection (on a node with a
    /// plaintext listener).
    async fn wait_until_booted(&mut self) -> Result<(), BootFailure> {
        let started = Instant::now();
        let port = self.amqp_port.or(self.tls_port).expect("a node has a plaintext or a TLS listener");
        loop {
            if self.server_exited() {
                if self.lost_a_port() {
                    return Err(BootFailure::PortClash);
                }
                return Err(BootFailure::Fatal(format!(
                    "the private RabbitMQ node {} exited while booting; run the test as root or as user \
                     rabbitmq, with RabbitMQ installed and {} reachable by user rabbitmq (set TMPDIR to \
                     /tmp otherwise). Its console:\n{}",
                    self.node,
                    self.dir.display(),
                    self.console_tail()
                )));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if started.elapsed() > BOOT_PATIENCE {
                return Err(BootFailure::Fatal(format!(
                    "the private RabbitMQ node {} did not open port {port} within {BOOT_PATIENCE:?}; its console:\n{}",
                    self.node,
                    self.console_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The port could belong to someone else: the node itself must report its boot finished
        // (it fails its boot when it cannot bind the port).
        let command = ctl_command(&self.node, &["await_startup", "--timeout", "60"]);
        let awaited = tokio::task::spawn_blocking(move || run_bounded(command, CTL_PATIENCE))
            .await
            .expect("the rabbitmqctl thread does not panic");
        match awaited {
            Ok(output) if output.status.success() => {}
            _ if self.lost_a_port() => return Err(BootFailure::PortClash),
            Ok(output) => {
                return Err(BootFailure::Fatal(format!(
                    "rabbitmqctl -n {} await_startup failed: {}{}; its console:\n{}",
                    self.node,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr),
                    self.console_tail()
                )))
            }
            Err(error) => {
                return Err(BootFailure::Fatal(format!(
                "rabbitmqctl -n {} await_startup {error}; install RabbitMQ (scripts/setup.sh) so that it is on PATH",
                self.node
            )))
            }
        }
        if self.amqp_port.is_none() {
            return Ok(());
        }
        let connection = Connection::connect(&self.url(), ConnectionProperties::default()).await.map_err(|e| {
            BootFailure::Fatal(format!("the private RabbitMQ node {} refuses guest on {}: {e}", self.node, self.url()))
        })?;
        let _ = connection.close(200, "booted".into()).await;
        // Listeners open before the boot finishes; this one must be up too.
        if let Some(port) = self.tls_port {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                return Err(BootFailure::Fatal(format!(
                    "the private RabbitMQ node {} booted without its TLS listener on port {port}; its log: {}",
                    self.node,
                    self.dir.join("log").display()
                )));
            }
        }
        Ok(())
    }

    fn server_exited(&mut self) -> bool {
        matches!(self.server.try_wait(), Ok(Some(_)))
    }

    /// The node failed its boot because another process holds its AMQP or distribution port.
    fn lost_a_port(&self) -> bool {
        let console = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        console.contains("eaddrinuse") || console.contains("dist_port_already_used")
    }

    /// The last 4,000 characters of the node's console output.
    fn console_tail(&self) -> String {
        let console = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let start = console.char_indices().rev().nth(4_000).map_or(0, |(i, _)| i);
        console[start..].to_string()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        stop_node(&self.node, &self.dir, &mut self.server);
        // The node is gone: the watchdog has nothing left to do. It only runs the shell builtin
        // `read`, so killing it leaves no process behind.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        if std::thread::panicking() {
            eprintln!("private RabbitMQ node {}: files and logs kept in {}", self.node, self.dir.display());
        } else if let Err(error) = fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove {}: {error}", self.dir.display());
        }
    }
}

/// Stops the node: `rabbitmqctl stop <pid file>` (which waits for the Erlang VM to exit), then,
/// if the VM is still alive, SIGKILL to its pid; finally reaps the wrapper process.
fn stop_node(node: &str, dir: &Path, server: &mut Child) {
    let pid_file = dir.join("pid");
    let pid_file = pid_file.to_string_lossy();
    let _ = run_bounded(ctl_command(node, &["stop", &pid_file]), STOP_PATIENCE);
    if let Some(pid) = beam_pid(dir) {
        kill(pid);
    }
    // The wrapper exits once the VM has; kill it too if it lingers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match server.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = server.kill();
                let _ = server.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The pid of the node's Erlang VM, if it is still running.
fn beam_pid(dir: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(dir.join("pid")).ok()?.trim().parse().ok()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    comm.starts_with("beam").then_some(pid)
}

fn kill(pid: u32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}

/// `rabbitmqctl -n <node> <args>`. Always `-n`: a bare rabbitmqctl addresses the shared node.
fn ctl_command(node: &str, args: &[&str]) -> Command {
    let mut command = Command::new("rabbitmqctl");
    command.arg("-n").arg(node).args(args);
    command
}

/// `n` distinct free loopback ports, none reserved. Every listener is held until all are chosen,
/// so they differ.
fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    while held.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port on 127.0.0.1");
        let port = listener.local_addr().expect("a bound listener has an address").port();
        if !reserved(port) {
            held.push((listener, port));
        }
    }
    held.into_iter().map(|(_, port)| port).collect()
}

/// `rabbitmq.conf` lines of a TLS listener on loopback `port` whose files are in `tls_dir`, with
/// certificate login next to PLAIN.
fn tls_config(listener: &TlsListener, port: u16, tls_dir: &Path) -> String {
    let file = |name: &str| tls_dir.join(name).display().to_string();
    format!(
        "listeners.ssl.1 = 127.0.0.1:{port}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = {}\n\
         auth_mechanisms.1 = PLAIN\n\
         auth_mechanisms.2 = EXTERNAL\n\
         ssl_cert_login_from = common_name\n",
        file("client-ca.pem"),
        file("server.pem"),
        file("server.key"),
        listener.require_client_certificate,
    )
}

/// Creates the node's directory with its config files (and the TLS listener's files, copied in),
/// owned by the user the node runs as.
fn prepare_directory(dir: &Path, amqp_port: u16, tls: Option<(&TlsListener, u16)>) -> Result<(), String> {
    for sub in ["mnesia", "log"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| format!("creating {}: {e}", dir.join(sub).display()))?;
    }
    // Loopback only; no management or prometheus plugin, so no listener competes with the shared
    // node's. Certificate login is a plugin of its own, without a listener.
    let mut config = format!("listeners.tcp.1 = 127.0.0.1:{amqp_port}\n");
    let mut plugins = "[].\n";
    if let Some((listener, port)) = tls {
        let tls_dir = dir.join("tls");
        fs::create_dir_all(&tls_dir).map_err(|e| format!("creating {}: {e}", tls_dir.display()))?;
        for (from, to) in [
            (&listener.cert_file, "server.pem"),
            (&listener.key_file, "server.key"),
            (&listener.client_ca_file, "client-ca.pem"),
        ] {
            fs::copy(from, tls_dir.join(to))
                .map_err(|e| format!("copying {} into {}: {e}", from.display(), tls_dir.display()))?;
        }
        config.push_str(&tls_config(listener, port, &tls_dir));
        plugins = "[rabbitmq_auth_mechanism_ssl].\n";
    }
    write_node_files(dir, &config, plugins)?;
    hand_to_rabbitmq(dir)
}

/// Writes the node's `rabbitmq.conf`, `enabled_plugins` and an empty environment file.
fn write_node_files(dir: &Path, config: &str, plugins: &str) -> Result<(), String> {
    let write = |name: &str, text: &str| -> Result<(), String> {
        fs::File::create(dir.join(name))
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|e| format!("writing {}: {e}", dir.join(name).display()))
    };
    write("rabbitmq.conf", config)?;
    write("enabled_plugins", plugins)?;
    write("rabbitmq-env.conf", "# Everything is set through the environment of rabbitmq-server.\n")
}

/// rabbitmq-server runs the node as user rabbitmq, which must write here. The directory is new,
/// so nothing but this node's files changes owner. The directory is removed when this fails.
fn hand_to_rabbitmq(dir: &Path) -> Result<(), String> {
    let chown = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(dir).output();
    match chown {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => {
            let _ = fs::remove_dir_all(dir);
            Err(format!(
                "cannot hand {} to user rabbitmq ({}): run the test as root or as user rabbitmq",
                dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(dir);
            Err(format!("cannot run chown: {e}"))
        }
    }
}

/// Creates the node's directory from the files of `deployment` (see
/// [`PrivateBroker::start_deployed`]): its configuration with paths under `/etc/rabbitmq/` moved
/// into `dir` and its listeners onto loopback `tls_port` and `prometheus_port`, its plugins, the
/// definitions file, and `tls`'s files where `ssl_options` names them.
fn prepare_deployed_directory(
    dir: &Path,
    deployment: &Path,
    tls: &TlsListener,
    tls_port: u16,
    prometheus_port: u16,
) -> Result<(), String> {
    let read = |name: &str| {
        let path = deployment.join(name);
        fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let (conf, plugins) = (read("rabbitmq.conf")?, read("enabled_plugins")?);
    let here = format!("{}/", dir.display());
    // (the file to copy, where the configuration now names it)
    let mut copies: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut config = String::new();
    let mut ssl_listeners = 0;
    for line in conf.lines() {
        let Some((key, value)) = line.split_once('=').filter(|_| !line.trim_start().starts_with('#')) else {
            config.push_str(line);
            config.push('\n');
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let unsupported = |why: &str| Err(format!("{}: `{line}`: {why}", deployment.join("rabbitmq.conf").display()));
        if key.starts_with("listeners.tcp.") {
            return unsupported("a plaintext listener would take a shared port; the harness cannot move it");
        }
        if key.starts_with("prometheus.") || key.starts_with("management.") {
            return unsupported("the harness sets the plugin listeners itself");
        }
        if key.starts_with("listeners.ssl.") {
            ssl_listeners += 1;
            config.push_str(&format!("{key} = 127.0.0.1:{tls_port}\n"));
            continue;
        }
        if key == "ssl_options.fail_if_no_peer_cert" && value != tls.require_client_certificate.to_string() {
            return unsupported(&format!(
                "the test expects fail_if_no_peer_cert = {} (TlsListener::require_client_certificate)",
                tls.require_client_certificate
            ));
        }
        if let Some(rest) = value.strip_prefix("/etc/rabbitmq/") {
            let moved = dir.join(rest);
            let from = match key {
                "ssl_options.certfile" => tls.cert_file.clone(),
                "ssl_options.keyfile" => tls.key_file.clone(),
                "ssl_options.cacertfile" => tls.client_ca_file.clone(),
                "load_definitions" => deployment.join(Path::new(rest).file_name().unwrap_or_default()),
                _ => return unsupported("the harness does not know which file to put there"),
            };
            copies.push((from, moved));
            config.push_str(&format!("{key} = {}\n", value.replace("/etc/rabbitmq/", &here)));
            continue;
        }
        config.push_str(line);
        config.push('\n');
    }
    if ssl_listeners != 1 {
        return Err(format!("{}: {ssl_listeners} TLS listeners; the harness moves exactly one", deployment.display()));
    }
    let enabled: Vec<&str> =
        plugins.trim().trim_end_matches('.').trim_matches(['[', ']']).split(',').map(str::trim).collect();
    if enabled.contains(&"rabbitmq_management") {
        return Err(format!("{}: the harness gives rabbitmq_management no port", deployment.display()));
    }
    if enabled.contains(&"rabbitmq_prometheus") {
        config.push_str(&format!("prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {prometheus_port}\n"));
    }
    for sub in ["mnesia", "log"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| format!("creating {}: {e}", dir.join(sub).display()))?;
    }
    let written = copies
        .iter()
        .try_for_each(|(from, to)| {
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
            }
            fs::copy(from, to).map(drop).map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
        })
        .and_then(|()| write_node_files(dir, &config, &plugins));
    if let Err(error) = written {
        let _ = fs::remove_dir_all(dir);
        return Err(error);
    }
    hand_to_rabbitmq(dir)
}

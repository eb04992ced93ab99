//! Running a command with a deadline, for the tests and for the private broker, which the
//! benchmark includes too (`benches/e2e.rs`): it needs nothing of the rest of the harness.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Runs a command to its end with a deadline, reading both its pipes meanwhile (a chatty command
/// cannot fill one and stall). One still running at the deadline is killed, and the error holds
/// what it had written to stderr.
pub fn run_bounded(mut command: Command, patience: Duration) -> Result<Output, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", command.get_program()))?;
    let pid = child.id();
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match outcome.recv_timeout(patience) {
        Ok(output) => return output.map_err(|e| format!("could not be waited for: {e}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            // A grandchild could hold the pipes open: do not wait on them for long.
            outcome.recv_timeout(Duration::from_secs(5))
        }
    };
    let stderr = match output {
        Ok(Ok(output)) => String::from_utf8_lossy(&output.stderr).into_owned(),
        _ => String::new(),
    };
    Err(format!("did not finish within {patience:?} and was killed; its stderr:\n{stderr}"))
}

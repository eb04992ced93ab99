#!/usr/bin/env bash
# End-to-end benchmark: the batchscore worker against the local RabbitMQ, next to its broker and
# engine ceilings and two Python workers (benches/e2e.rs describes what is measured).
#
#   scripts/bench.sh                    full run, about 12 minutes on 2 cores
#   BENCH_SCALE=0.1 scripts/bench.sh    quick check: a tenth of the jobs, shorter open loops
#
# Prepares what it needs (ONNX Runtime and RabbitMQ through scripts/setup.sh, the Python workers'
# packages through pip), builds the release worker, runs the benchmark, and leaves the report in
# target/bench/e2e.md (printed at the end) with worker logs in target/bench/logs/.
# BENCH_PYTHON picks the Python interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bench] %s\n' "$*" >&2; }

PYTHON=${BENCH_PYTHON:-python3}
REQUIREMENTS=benches/python/requirements.txt

# True when every pinned package of the requirements file is installed at its version.
python_ready() {
  "$PYTHON" - "$REQUIREMENTS" <<'PY'
import sys
from importlib import metadata
missing = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, version = line.partition("==")
    try:
        if version and metadata.version(name) != version:
            missing.append(line)
    except metadata.PackageNotFoundError:
        missing.append(line)
sys.exit(1 if missing else 0)
PY
}

scripts/setup.sh

if ! python_ready; then
  log "installing $REQUIREMENTS for the Python workers"
  "$PYTHON" -m pip install --quiet -r "$REQUIREMENTS"
fi

# The benchmark runs the worker binary cargo builds for it (CARGO_BIN_EXE_batchscore), with the
# dependency features of every target; a plain `cargo build --release` would build another one.
log "building the benchmark and its release worker"
cargo bench --locked --bench e2e --no-run

export BENCH_PYTHON="$PYTHON"
export BENCH_COMMAND="scripts/bench.sh"
REPORT="${CARGO_TARGET_DIR:-target}/bench/e2e.md"
export BENCH_REPORT="$REPORT"
# The benchmark prints the report on stdout as it finishes; it exits non-zero when a measurement
# failed (targets not met are only marked in the report).
status=0
cargo bench --locked --bench e2e || status=$?
[ -f "$REPORT" ] && log "report: $REPORT"
exit "$status"

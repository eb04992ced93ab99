#!/usr/bin/env bash
# Prepares a machine for batchscore: the ONNX Runtime library in .onnxruntime/ and a RabbitMQ
# broker on 127.0.0.1:5672 (started, or installed and started, when none answers).
# Safe to run again: it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.31.1
ORT_DIR=.onnxruntime
ORT_LIB="$ORT_DIR/libonnxruntime.so.$ORT_VERSION"

log() { printf '[setup] %s\n' "$*" >&2; }

install_onnxruntime() {
  if [ -f "$ORT_LIB" ]; then return; fi
  log "downloading onnxruntime==$ORT_VERSION (PyPI wheel) for its shared library"
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "onnxruntime==$ORT_VERSION"
  mkdir -p "$ORT_DIR"
  python3 - "$tmp"/onnxruntime-*.whl "$ORT_DIR" "$ORT_VERSION" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z:
    (dest / pathlib.Path(name).name).write_bytes(z.read(name))
PY
  rm -rf "$tmp"
  log "ONNX Runtime library at $ORT_LIB"
}

broker_answers() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

start_rabbitmq() {
  if broker_answers; then return; fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      log "installing rabbitmq-server (Debian package)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
    else
      log "no broker on 127.0.0.1:5672 and rabbitmq-server is not installed; install RabbitMQ or set amqp.url"
      exit 1
    fi
  fi
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  rabbitmqctl await_startup --timeout 120 >/dev/null
  for _ in $(seq 1 60); do broker_answers && return; sleep 1; done
  log "RabbitMQ did not open 127.0.0.1:5672"; exit 1
}

# A broker under a memory or disk alarm blocks every publisher: the worker, `submit` and the tests
# would wait on it. Say so now, with the fix, rather than later as a timeout.
check_alarms() {
  command -v rabbitmq-diagnostics >/dev/null 2>&1 || return 0
  local report
  report=$(rabbitmq-diagnostics -q check_alarms 2>&1) && return 0
  case "$report" in
    *"alarm on node"*)
      log "the broker on 127.0.0.1:5672 blocks publishers: $report"
      log "free disk space or memory on its machine (its limits: rabbitmq-diagnostics status), then run this again"
      exit 1 ;;
  esac
}

install_onnxruntime
start_rabbitmq
check_alarms

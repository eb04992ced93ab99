#!/usr/bin/env bash
# Scores the demo model through the worker with ONNX Runtime's CUDA execution provider, then the
# same rows on the CPU with the same library, and prints both throughputs. Needs an NVIDIA GPU
# with its driver, and CUDA 13 and cuDNN 9 libraries on the loader path (docs/GPU.md).
#   scripts/gpu_bench.sh            # 200,000 rows in jobs of 1,000
#   ROWS=1000000 BATCH_ROWS=16384 scripts/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.31.1
GPU_DIR=.onnxruntime-gpu
GPU_LIB="$GPU_DIR/libonnxruntime.so.$ORT_VERSION"
ROWS=${ROWS:-200000}
BATCH_ROWS=${BATCH_ROWS:-8192}
METRICS_PORT=${METRICS_PORT:-9477}
log() { printf '[gpu-bench] %s\n' "$*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  log "no NVIDIA GPU answers nvidia-smi on this machine: nothing to measure"
  exit 0
fi
nvidia-smi -L >&2

scripts/setup.sh
if [ ! -f "$GPU_LIB" ]; then
  log "downloading onnxruntime-gpu==$ORT_VERSION (PyPI wheel) for its libraries"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "onnxruntime-gpu==$ORT_VERSION"
  mkdir -p "$GPU_DIR"
  python3 - "$tmp"/onnxruntime_gpu-*.whl "$GPU_DIR" <<'PY'
import pathlib, sys, zipfile
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = pathlib.Path(name).name
        if name.startswith("onnxruntime/capi/libonnxruntime") and ".so" in base:
            (dest / base).write_bytes(z.read(name))
PY
  rm -rf "$tmp"
fi
cargo build --release --locked --quiet

work=$(mktemp -d)
trap 'kill "${worker:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
python3 - models/credit_default/samples/applicants.csv "$work/rows.csv" "$ROWS" <<'PY'
import itertools, sys
source, target, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = open(source).read().splitlines()
with open(target, "w") as out:
    out.write(lines[0] + "\n")
    for line in itertools.islice(itertools.cycle(lines[1:]), rows):
        out.write(line + "\n")
PY

run() {
  # Fixed names: a rerun reuses the queues instead of leaving new ones behind.
  local provider=$1 queue="bench.gpu.$1"
  BATCHSCORE__AMQP__JOBS_QUEUE=$queue BATCHSCORE__AMQP__RESULTS_QUEUE=$queue.results \
  BATCHSCORE__AMQP__DEAD_LETTER_EXCHANGE=$queue.dlx BATCHSCORE__AMQP__DEAD_LETTER_QUEUE=$queue.dlq \
  BATCHSCORE__INFERENCE__EXECUTION_PROVIDER=$provider BATCHSCORE__BATCHING__MAX_BATCH_ROWS=$BATCH_ROWS \
  BATCHSCORE__METRICS__LISTEN=127.0.0.1:$METRICS_PORT BATCHSCORE__LOGGING__LEVEL=warn ORT_DYLIB_PATH=$GPU_LIB \
    target/release/batchscore worker &
  worker=$!
  for _ in $(seq 1 600); do
    curl -fs "127.0.0.1:$METRICS_PORT/readyz" >/dev/null 2>&1 && break
    kill -0 "$worker" 2>/dev/null || { log "the worker did not start on $provider"; exit 1; }
    sleep 0.1
  done
  if ! curl -fs "127.0.0.1:$METRICS_PORT/metrics" | grep -q "batchscore_model_info{.*provider=\"$provider\".*} 1"; then
    log "the worker does not report provider=\"$provider\""; exit 1
  fi
  BATCHSCORE__AMQP__JOBS_QUEUE=$queue target/release/batchscore submit --model credit_default \
    --input "$work/rows.csv" --output "$work/$provider.csv" --chunk-rows 1000 | sed "s/^/$provider: /"
  curl -fs "127.0.0.1:$METRICS_PORT/metrics" | python3 -c '
import re, sys
text = sys.stdin.read()
def total(name):
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
rows, seconds = total("batchscore_batch_rows_sum"), total("batchscore_inference_duration_seconds_sum")
runs = total("batchscore_batch_rows_count")
print(f"'"$provider"': {rows:.0f} rows in {runs:.0f} runs (mean {rows / max(runs, 1):.0f} rows), "
      f"{rows / max(seconds, 1e-9):,.0f} rows/s inside ONNX Runtime")'
  kill -TERM "$worker"; wait "$worker" || true
}

run cuda
run cpu
log "outputs agree within 1e-4:"
python3 - "$work/cuda.csv" "$work/cpu.csv" <<'PY'
import csv, sys
gpu, cpu = (list(csv.reader(open(p))) for p in sys.argv[1:])
worst = max(abs(float(a) - float(b)) for ra, rb in zip(gpu[1:], cpu[1:]) for a, b in zip(ra, rb)
            if a.replace(".", "").replace("-", "").replace("e", "").isdigit())
print(f"max abs difference GPU vs CPU: {worst:.2e}")
sys.exit(0 if worst <= 1e-4 else 1)
PY

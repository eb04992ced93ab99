#!/usr/bin/env bash
# Runs the whole test suite against the real RabbitMQ and ONNX Runtime, preparing both first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --locked --no-fail-fast "$@"

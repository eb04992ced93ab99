#!/usr/bin/env bash
# Runs the whole test suite against the real RabbitMQ, ONNX Runtime and PostgreSQL, preparing the
# first two and checking that the third answers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# tests/audit_sink.rs creates a database of its own on PostgreSQL (BATCHSCORE_TEST_POSTGRES, else
# postgres@127.0.0.1:5432 without a password): say so now rather than as a failed test later.
if [ -z "${BATCHSCORE_TEST_POSTGRES:-}" ] && ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  echo "[test] PostgreSQL does not answer on 127.0.0.1:5432; the audit sink tests need it. Start it" \
    "(e.g. pg_ctlcluster 15 main start), or set BATCHSCORE_TEST_POSTGRES to the URL of a user that may" \
    "create databases and roles" >&2
  exit 1
fi
cargo test --locked --no-fail-fast "$@"

#!/usr/bin/env bash
# From a fresh clone: prepares the machine (ONNX Runtime library, RabbitMQ), builds the release
# binary, starts a worker on the bundled credit_default model, scores the sample applicants
# through the broker, prints the results (and the reasons for them) and stops the worker.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked
mkdir -p out

BATCHSCORE__METRICS__LISTEN=127.0.0.1:0 target/release/batchscore worker > out/worker.log 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null || true; wait $worker 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  grep -q "consuming jobs" out/worker.log && break
  kill -0 "$worker" 2>/dev/null || { cat out/worker.log; echo "the worker stopped; see above" >&2; exit 1; }
  sleep 0.5
done
sed 's/\x1b\[[0-9;]*m//g' out/worker.log

echo
echo "== 200 applicants (CSV with a header naming the features), jobs of 50 rows"
target/release/batchscore submit --model credit_default --chunk-rows 50 \
  --input models/credit_default/samples/applicants.csv --output out/applicants_scored.csv
echo "first rows of out/applicants_scored.csv (label 1 = predicted default):"
head -6 out/applicants_scored.csv

echo
echo "== the same applicants as named records (JSONL), jobs of 20 rows"
target/release/batchscore submit --model credit_default --chunk-rows 20 \
  --input models/credit_default/samples/applicants.jsonl --output out/applicants_scored.jsonl
head -3 out/applicants_scored.jsonl

echo
echo "== the same applicants with the reasons for each score (--explain): reason codes in CSV"
target/release/batchscore submit --model credit_default --chunk-rows 50 --explain \
  --input models/credit_default/samples/applicants.csv --output out/applicants_explained.csv
echo "first rows of out/applicants_explained.csv (reason_1..4: codes of models/credit_default/config.yaml):"
head -6 out/applicants_explained.csv | cut -d, -f1,4-
echo
echo "Outputs are in out/; the worker log is out/worker.log. See README.md for the message contract."

#!/usr/bin/env bash
# Checks the observability set-up end to end against a real worker, RabbitMQ and Prometheus:
#   1. promtool validates deploy/prometheus/*.yml and runs the alert unit tests;
#   2. a worker (target/debug/batchscore) scores jobs, plus three bad jobs, on a RabbitMQ node of
#      the check's own (scripts/private_rabbitmq.sh: own name, ports and files, with the
#      rabbitmq_prometheus plugin enabled on that node only), and its /metrics scrape passes
#      `promtool check metrics` and matches the documented list;
#   3. a Prometheus built from deploy/prometheus/prometheus.yml scrapes the worker and that node
#      every second and evaluates every expression of the Grafana dashboard and every alert
#      rule: each must parse, each dashboard expression must return data (except an explicit
#      allow-list in scripts/observability_check.py), and every series an alert rule reads must
#      exist.
# The private node uses the default queue names (scoring.jobs, scoring.dlq, ...), the ones the
# alert rules watch. The shared broker on 127.0.0.1:5672 is neither used nor reconfigured.
# Installs what is missing on Debian (prometheus, pika); stops and removes everything it starts,
# on failure and interruption too. Needs root (or user rabbitmq) for the private node.
# Run from anywhere: scripts/check_observability.sh
#
# Environment:
#   BATCHSCORE_BIN     worker binary to use instead of building target/debug/batchscore
#   BATCHSCORE_CONFIG  settings file for the worker and submit (default settings.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$(date +%s)

log() { printf '[observability] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

config=${BATCHSCORE_CONFIG:-settings.yaml}
py=python3
helper="$root/scripts/observability_check.py"

# ---------------------------------------------------------------------------- tools
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    die "cannot install $* (needs Debian's apt-get as root)"
  fi
  log "installing $* (Debian packages)"
  # Keep the package from starting a system-wide service of its own; restore the policy after.
  local policy=/usr/sbin/policy-rc.d created=''
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created=1
  fi
  local rc=0 apt_log
  apt_log=$(mktemp)
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>"$apt_log"; } \
    || { rc=$?; cat "$apt_log" >&2; }
  rm -f "$apt_log"
  [ -z "$created" ] || rm -f "$policy"
  [ "$rc" = 0 ] || die "apt-get install $* failed"
}

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  apt_install prometheus
fi
command -v curl >/dev/null 2>&1 || apt_install curl
if ! $py -c 'import pika' 2>/dev/null; then
  log "installing pika"
  if ! $py -m pip install --quiet pika 2>/dev/null; then
    apt_install python3-pika
    py=/usr/bin/python3
  fi
fi

# ---------------------------------------------------------------------------- run-scoped state, cleanup
scripts/setup.sh   # ONNX Runtime library, and RabbitMQ installed (its shared broker is not used)

id="obscheck.$(date +%s).$$"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/batchscore-observability.XXXXXX")
rabbit_state="$tmp/rabbitmq.env"
rabbit_starter=''
worker_pid=''
prom_pid=''

cleanup() {
  local rc=$?
  [ -z "$prom_pid" ] || { kill -TERM "$prom_pid" 2>/dev/null || true; wait "$prom_pid" 2>/dev/null || true; }
  [ -z "$worker_pid" ] || { kill -TERM "$worker_pid" 2>/dev/null || true; wait "$worker_pid" 2>/dev/null || true; }
  # A start still booting stops its node itself when terminated; `stop` then finds nothing left.
  [ -z "$rabbit_starter" ] || { kill -TERM "$rabbit_starter" 2>/dev/null || true; wait "$rabbit_starter" 2>/dev/null || true; }
  if [ "$rc" != 0 ]; then
    for f in rabbitmq-start.log worker.log prometheus.log; do
      [ -s "$tmp/$f" ] && { log "last lines of $f:"; tail -n 20 "$tmp/$f" | sed 's/\x1b\[[0-9;]*m//g' >&2; }
    done
    if [ -n "${PRIVATE_RABBITMQ_NODE:-}" ] && [ -s "$PRIVATE_RABBITMQ_DIR/log/$PRIVATE_RABBITMQ_NODE.log" ]; then
      log "last lines of the private RabbitMQ node's log:"
      tail -n 20 "$PRIVATE_RABBITMQ_DIR/log/$PRIVATE_RABBITMQ_NODE.log" >&2
    fi
  fi
  scripts/private_rabbitmq.sh stop "$rabbit_state" \
    || log "could not stop the private RabbitMQ node named in $rabbit_state (stop it by its pid)"
  rm -rf "$tmp"
  log "finished in $(( $(date +%s) - started )) s, exit $rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------- private broker
# Boots while the static checks and the build run; its watchdog stops it should this script be
# killed without running cleanup.
log "starting a private RabbitMQ node with the rabbitmq_prometheus plugin"
# Its stdout repeats the state file; its messages go to rabbitmq-start.log.
scripts/private_rabbitmq.sh start "$rabbit_state" --prometheus --name batchscore-obs --watch $$ \
  > /dev/null 2> "$tmp/rabbitmq-start.log" &
rabbit_starter=$!

# ---------------------------------------------------------------------------- static checks
log "promtool: configuration, rules, alert unit tests"
promtool check config deploy/prometheus/prometheus.yml
promtool check config deploy/prometheus/prometheus.compose.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
$py -c 'import json, sys; [json.load(open(p)) for p in sys.argv[1:]]' deploy/grafana/dashboards/*.json \
  || die "dashboard JSON does not parse"

# ---------------------------------------------------------------------------- worker binary
if [ -n "${BATCHSCORE_BIN:-}" ]; then
  bin=$BATCHSCORE_BIN
else
  # A no-op when the binary is up to date; rebuilds it after source changes.
  log "cargo build --locked (debug)"
  cargo build --locked --quiet
  bin=target/debug/batchscore
fi
[ -x "$bin" ] || die "no worker binary at $bin"

if ! wait "$rabbit_starter"; then
  cat "$tmp/rabbitmq-start.log" >&2 && : > "$tmp/rabbitmq-start.log"
  die "the private RabbitMQ node did not start (above)"
fi
rabbit_starter=''
# shellcheck disable=SC1090  # written by scripts/private_rabbitmq.sh
. "$rabbit_state"
rabbit=$PRIVATE_RABBITMQ_PROMETHEUS
log "private RabbitMQ node $PRIVATE_RABBITMQ_NODE: AMQP on 127.0.0.1:$PRIVATE_RABBITMQ_AMQP_PORT, metrics on $rabbit"

# The worker, submit and the helper's publishes all go to the private node. The queue names are
# the defaults the alert rules watch (deploy/prometheus/alerts.yml), set here so that a settings
# file with other names does not leave those rules without data.
export BATCHSCORE__AMQP__URL="$PRIVATE_RABBITMQ_URL"
export BATCHSCORE__AMQP__JOBS_QUEUE=scoring.jobs
export BATCHSCORE__AMQP__RESULTS_QUEUE=scoring.results
export BATCHSCORE__AMQP__DEAD_LETTER_EXCHANGE=scoring.dlx
export BATCHSCORE__AMQP__DEAD_LETTER_QUEUE=scoring.dlq
export BATCHSCORE__AMQP__CONNECTION_NAME="$id"
worker_port=$($py "$helper" free-port)
prom_port=$($py "$helper" free-port)

# ---------------------------------------------------------------------------- worker
log "starting a worker with metrics on 127.0.0.1:$worker_port"
BATCHSCORE__METRICS__LISTEN="127.0.0.1:$worker_port" BATCHSCORE__LOGGING__FORMAT=text \
  "$bin" --config "$config" worker > "$tmp/worker.log" 2>&1 &
worker_pid=$!
for _ in $(seq 1 120); do
  curl -fsS -o /dev/null "http://127.0.0.1:$worker_port/readyz" 2>/dev/null && break
  kill -0 "$worker_pid" 2>/dev/null || die "the worker exited before it was ready"
  sleep 0.5
done
curl -fsS -o /dev/null "http://127.0.0.1:$worker_port/readyz" || die "the worker was not ready within 60 s"
curl -fsS -o /dev/null "http://127.0.0.1:$worker_port/healthz" || die "/healthz does not answer 200"

# ---------------------------------------------------------------------------- Prometheus
# Started before any job, so that rates and quantiles see counters move between scrapes.
log "starting Prometheus on 127.0.0.1:$prom_port (config from deploy/prometheus/prometheus.yml)"
$py "$helper" prometheus-config deploy/prometheus/prometheus.yml "$tmp/prometheus.yml" \
  "127.0.0.1:$worker_port" "$rabbit" "$root/deploy/prometheus/alerts.yml"
promtool check config "$tmp/prometheus.yml" >/dev/null
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn > "$tmp/prometheus.log" 2>&1 &
prom_pid=$!
for _ in $(seq 1 60); do
  curl -fsS -o /dev/null "http://127.0.0.1:$prom_port/-/ready" 2>/dev/null && break
  kill -0 "$prom_pid" 2>/dev/null || die "Prometheus exited at start-up"
  sleep 0.5
done
$py "$helper" wait-prometheus "http://127.0.0.1:$prom_port"

# ---------------------------------------------------------------------------- traffic
submit() {
  "$bin" --config "$config" submit --model credit_default --chunk-rows 20 \
    --input models/credit_default/samples/applicants.csv --output "$tmp/scores-$1.csv" --timeout-s 60 \
    > "$tmp/submit-$1.log" 2>&1 || { cat "$tmp/submit-$1.log" >&2; die "submit $1 failed"; }
}
# Two rounds, two scrapes apart: counters created in the first round move in the second.
for round in 1 2; do
  log "round $round: scoring models/credit_default/samples/applicants.csv as jobs of 20 rows"
  submit "$round"
  log "round $round: publishing three bad jobs (not JSON; wrong number of features; unknown model)"
  $py "$helper" publish-bad-jobs
  [ "$round" = 2 ] || sleep 2
done
sleep 1

# ---------------------------------------------------------------------------- scrape
log "checking the worker's /metrics"
curl -fsS "http://127.0.0.1:$worker_port/metrics" > "$tmp/metrics.txt"
promtool check metrics < "$tmp/metrics.txt" || die "promtool check metrics reports problems (above)"
$py "$helper" check-scrape "$tmp/metrics.txt" || scrape_failed=1

# ---------------------------------------------------------------------------- expressions
sleep 3   # a few more scrapes after the last job
log "evaluating dashboard and alert expressions through Prometheus"
$py "$helper" evaluate "http://127.0.0.1:$prom_port" deploy/grafana/dashboards/batchscore.json || eval_failed=1

[ -z "${scrape_failed:-}" ] || die "the worker's metrics do not match the documented list (above)"
[ -z "${eval_failed:-}" ] || die "dashboard or alert expressions failed (above)"
log "OK"

#!/usr/bin/env bash
# A RabbitMQ node of the caller's own: own node name, free ports, own data, log and config files
# under a temporary directory, loopback only. The shared broker (rabbit@localhost on 5672) is
# never touched: every rabbitmqctl call names the private node with -n, and nothing is enabled,
# configured or stopped anywhere else. The same approach as tests/common/private_broker.rs.
#
#   scripts/private_rabbitmq.sh start STATE [--prometheus] [--name PREFIX] [--watch PID]
#   scripts/private_rabbitmq.sh stop STATE
#
# start boots a node and waits (bounded) until it has finished booting and answers AMQP (and,
# with --prometheus, its rabbitmq_prometheus endpoint, enabled on this node only). It writes
# STATE, a shell file to source, as soon as the node's directory exists (so `stop STATE` cleans
# up after an interrupted start too), and prints the final STATE on stdout:
#   PRIVATE_RABBITMQ_NODE        Erlang node name, <PREFIX>-<8 hex>@localhost
#   PRIVATE_RABBITMQ_URL         amqp://guest:guest@127.0.0.1:<port>/%2f
#   PRIVATE_RABBITMQ_AMQP_PORT   PRIVATE_RABBITMQ_DIST_PORT
#   PRIVATE_RABBITMQ_PROMETHEUS  127.0.0.1:<port> of /metrics (empty without --prometheus)
#   PRIVATE_RABBITMQ_PID         the node's Erlang VM (beam.smp)
#   PRIVATE_RABBITMQ_DIR         its files (console.log, log/, mnesia/)
# --watch PID leaves a watchdog that stops the node once process PID is gone (a caller killed
# before it could run `stop`). A failed start stops what it started and removes its files.
#
# stop stops the node (rabbitmqctl stop, then SIGKILL to its pid if it lingers), its wrapper and
# watchdog, and removes its directory and STATE. Safe to run twice or after a failed start.
#
# Needs RabbitMQ's Debian scripts (they run the node as user rabbitmq) and root or user rabbitmq;
# the directory is created under $TMPDIR (default /tmp), which user rabbitmq must be able to reach.
set -euo pipefail

# Longest a boot may take (a cold boot takes 15-20 s on a busy 2-core machine), one rabbitmqctl
# command may run, and the orderly stop may take before the node is killed; boot attempts, a new
# one only after a port clash (another process took a port between choosing and binding it).
BOOT_PATIENCE_S=120
CTL_PATIENCE_S=130
STOP_PATIENCE_S=60
ATTEMPTS=3

self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
log() { printf '[private-rabbitmq] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
usage() { sed -n '7,8p' "$self" | sed 's/^# *//' >&2; exit 2; }

# rabbitmqctl aimed at one node only. Inherited RABBITMQ_* variables could point it elsewhere.
ctl() {
  local node=$1; shift
  timeout --kill-after=5 "$CTL_PATIENCE_S" env $(env | sed -n 's/^\(RABBITMQ_[A-Za-z0-9_]*\)=.*/-u \1/p') \
    rabbitmqctl -n "$node" "$@" </dev/null
}

# A node name this script made: never the shared node, whatever STATE says.
own_node() { [[ "$1" =~ ^[a-z0-9-]+-[0-9a-f]{8}@localhost$ ]]; }

# Distinct free loopback ports, none reserved: epmd, the shared node's AMQP, distribution,
# management and prometheus ports, and the range rabbitmqctl binds for its own distribution.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
reserved = {4369, 5672, 25672, 15672, 15692, *range(35672, 35683)}
held = []
while len(held) < int(sys.argv[1]):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    if s.getsockname()[1] in reserved:
        s.close()
    else:
        held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

port_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The Erlang VM's pid from the node's pid file, if that process is still a beam.
beam_pid() {
  local pid
  pid=$(cat "$1/pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && grep -q '^beam' "/proc/$pid/comm" 2>/dev/null && printf '%s\n' "$pid"
}

# Process PID still runs with RABBITMQ_NODENAME=NODE in its environment (the wrapper of this
# node, not a process that reused its pid).
runs_node() {
  { tr '\0' '\n' < "/proc/$1/environ"; } 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$2"
}

write_state() {
  {
    printf 'PRIVATE_RABBITMQ_NODE=%q\n' "$node"
    printf 'PRIVATE_RABBITMQ_URL=%q\n' "${amqp_port:+amqp://guest:guest@127.0.0.1:$amqp_port/%2f}"
    printf 'PRIVATE_RABBITMQ_AMQP_PORT=%q\n' "${amqp_port:-}"
    printf 'PRIVATE_RABBITMQ_DIST_PORT=%q\n' "${dist_port:-}"
    printf 'PRIVATE_RABBITMQ_PROMETHEUS=%q\n' "${prometheus:-}"
    printf 'PRIVATE_RABBITMQ_PID=%q\n' "${beam:-}"
    printf 'PRIVATE_RABBITMQ_DIR=%q\n' "$dir"
    printf 'PRIVATE_RABBITMQ_WRAPPER_PID=%q\n' "${wrapper:-}"
    printf 'PRIVATE_RABBITMQ_WATCHDOG_PID=%q\n' "${watchdog:-}"
  } > "$state.new" && mv -f "$state.new" "$state"
  cp -f "$state" "$dir/state"
}

# ------------------------------------------------------------------------------------------ stop
# Stops node NODE with files in DIR and wrapper WRAPPER (may be empty); leaves DIR in place.
stop_node() {
  local node=$1 dir=$2 wrapper=$3 pid
  own_node "$node" || die "refusing to stop node '$node': not a node this script started"
  if [ -d "$dir" ]; then
    if [ -s "$dir/pid" ]; then
      ctl "$node" stop "$dir/pid" >/dev/null 2>&1 &
    else
      ctl "$node" stop >/dev/null 2>&1 &
    fi
    local stopper=$!
    # The orderly stop waits for the VM to exit; bounded, then the VM is killed.
    for _ in $(seq 1 $((STOP_PATIENCE_S * 5))); do kill -0 "$stopper" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$stopper" 2>/dev/null || true
    wait "$stopper" 2>/dev/null || true
    if pid=$(beam_pid "$dir"); then
      log "node $node did not stop within ${STOP_PATIENCE_S} s; killing its VM (pid $pid)"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # The wrapper (su ... rabbitmq-server) exits once the VM has; kill it if it lingers.
  if [ -n "$wrapper" ] && runs_node "$wrapper" "$node"; then
    for _ in $(seq 1 50); do runs_node "$wrapper" "$node" || break; sleep 0.2; done
    runs_node "$wrapper" "$node" && kill -KILL "$wrapper" 2>/dev/null || true
  fi
}

cmd_stop() {
  local state=$1
  [ -e "$state" ] || return 0
  local PRIVATE_RABBITMQ_NODE='' PRIVATE_RABBITMQ_DIR='' PRIVATE_RABBITMQ_WRAPPER_PID='' PRIVATE_RABBITMQ_WATCHDOG_PID=''
  # shellcheck disable=SC1090  # written by write_state above
  . "$state"
  local node=$PRIVATE_RABBITMQ_NODE dir=$PRIVATE_RABBITMQ_DIR
  case "$dir" in */batchscore-rabbitmq-*) ;; *) die "refusing to remove '$dir' named in $state" ;; esac
  # The watchdog first, so that it does not run a second stop alongside this one. It is this
  # script in a subshell: a TERM ends it at its next `sleep 1`.
  if [ -n "$PRIVATE_RABBITMQ_WATCHDOG_PID" ] && [ "$PRIVATE_RABBITMQ_WATCHDOG_PID" != "${watchdog_self:-}" ]; then
    kill -TERM "$PRIVATE_RABBITMQ_WATCHDOG_PID" 2>/dev/null || true
  fi
  stop_node "$node" "$dir" "$PRIVATE_RABBITMQ_WRAPPER_PID"
  rm -rf "$dir"
  rm -f "$state" "$state.new"
}

# ----------------------------------------------------------------------------------------- start
cmd_start() {
  state=$1; shift
  local plugins='' prefix=batchscore watch=''
  while [ $# -gt 0 ]; do
    case "$1" in
      --prometheus) plugins=rabbitmq_prometheus ;;
      --name) [[ "${2:-}" =~ ^[a-z0-9-]+$ ]] || die "--name takes [a-z0-9-]+"; prefix=$2; shift ;;
      --watch) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "--watch takes a pid"; watch=$2; shift ;;
      *) usage ;;
    esac
    shift
  done
  [ "$(id -u)" = 0 ] || [ "$(id -un)" = rabbitmq ] \
    || die "run as root or as user rabbitmq: RabbitMQ's scripts run the node as user rabbitmq"
  command -v rabbitmq-server >/dev/null && command -v rabbitmqctl >/dev/null \
    || die "rabbitmq-server is not on PATH: install RabbitMQ (scripts/setup.sh) or add /usr/sbin to PATH"
  [ ! -e "$state" ] || die "$state exists: stop that node first (scripts/private_rabbitmq.sh stop $state)"

  # As user rabbitmq, Debian's wrapper would send the node's output to the shared node's
  # /var/log/rabbitmq/startup_log: call the script it wraps. As root it runs that as rabbitmq.
  local server=rabbitmq-server
  if [ "$(id -u)" != 0 ] && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    server=/usr/lib/rabbitmq/bin/rabbitmq-server
  fi
  local id
  id=$(tr -d '-' < /proc/sys/kernel/random/uuid | cut -c1-8)
  node="$prefix-$id@localhost"
  dir=$(mktemp -d "${TMPDIR:-/tmp}/batchscore-rabbitmq-$id.XXXX")
  amqp_port='' dist_port='' prometheus='' beam='' wrapper='' watchdog=''
  write_state
  # Whatever ends this start early (failure, INT, TERM) stops what it started.
  trap 'rc=$?; trap - EXIT; if [ "$rc" != 0 ]; then cmd_stop "$state"; fi; exit "$rc"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  local attempt ports prom_port=''
  for attempt in $(seq 1 "$ATTEMPTS"); do
    if [ -n "$plugins" ]; then read -r amqp_port dist_port prom_port <<< "$(free_ports 3)"
    else read -r amqp_port dist_port <<< "$(free_ports 2)"; fi
    mkdir -p "$dir/mnesia" "$dir/log"
    {
      echo "# Written by scripts/private_rabbitmq.sh for node $node."
      echo "listeners.tcp.1 = 127.0.0.1:$amqp_port"
      if [ -n "$plugins" ]; then
        # The plugin's own listener, on loopback; no management plugin, so no :15672 listener.
        echo "prometheus.tcp.port = $prom_port"
        echo "prometheus.tcp.ip = 127.0.0.1"
      fi
    } > "$dir/rabbitmq.conf"
    echo "[$plugins]." > "$dir/enabled_plugins"
    echo "# Everything is set through the environment of rabbitmq-server." > "$dir/rabbitmq-env.conf"
    : > "$dir/console.log"
    # The node runs as user rabbitmq and writes here. The directory is new: nothing but this
    # node's files changes owner.
    chown -R rabbitmq:rabbitmq "$dir" \
      || die "cannot hand $dir to user rabbitmq: run as root, or set TMPDIR to a directory rabbitmq can reach"
    if [ "$(id -u)" = 0 ] && ! su rabbitmq -s /bin/sh -c 'test -w "$1"' sh "$dir" 2>/dev/null; then
      die "user rabbitmq cannot write to $dir: set TMPDIR to a directory it can reach (e.g. /tmp)"
    fi
    write_state

    # Instead of /etc/rabbitmq/rabbitmq-env.conf (which names the shared node) and the shared
    # config and plugin files, everything comes from here. The node's working directory is the
    # shared node's /var/lib/rabbitmq: a failed boot's crash dump goes here instead. epmd and
    # distribution stay on loopback, as the shared env file sets them.
    env $(env | sed -n 's/^\(RABBITMQ_[A-Za-z0-9_]*\)=.*/-u \1/p') \
      RABBITMQ_NODENAME="$node" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$amqp_port" \
      RABBITMQ_DIST_PORT="$dist_port" \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" \
      RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_PID_FILE="$dir/pid" \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
      RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
      RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
      ERL_CRASH_DUMP="$dir/erl_crash.dump" \
      ERL_EPMD_ADDRESS=127.0.0.1 \
      ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      "$server" </dev/null >>"$dir/console.log" 2>&1 &
    wrapper=$!
    write_state

    if wait_booted "$prom_port"; then
      break
    fi
    # A port clash: stop this attempt's node and try again with other ports.
    stop_node "$node" "$dir" "$wrapper"
    wait "$wrapper" 2>/dev/null || true
    find "$dir" -mindepth 1 -delete
    wrapper=''
    [ "$attempt" != "$ATTEMPTS" ] || die "node $node lost its ports to other processes $ATTEMPTS times in a row"
    log "a port of node $node was taken meanwhile; trying other ports"
  done

  beam=$(beam_pid "$dir") || die "node $node booted but its pid file $dir/pid names no running beam"
  [ -z "$plugins" ] || prometheus="127.0.0.1:$prom_port"
  if [ -n "$watch" ]; then
    # Watchdog: polls the owner once a second; HUP and INT of a terminal do not end it.
    (
      trap - EXIT TERM
      trap '' INT HUP
      watchdog_self=$BASHPID
      while kill -0 "$watch" 2>/dev/null && [ -d "$dir" ]; do sleep 1; done
      [ ! -d "$dir" ] || cmd_stop "$dir/state"
    ) </dev/null >/dev/null 2>&1 &
    watchdog=$!
  fi
  write_state
  trap - EXIT INT TERM
  cat "$state"
}

# Returns 0 once the node booted, 1 after a port clash; exits on any other failure.
wait_booted() {
  local prom_port=$1 deadline=$((SECONDS + BOOT_PATIENCE_S))
  until port_answers "$amqp_port"; do
    if ! kill -0 "$wrapper" 2>/dev/null; then
      lost_a_port && return 1
      die "node $node exited while booting. Its console ($dir/console.log):
$(tail -c 4000 "$dir/console.log")"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "node $node did not open port $amqp_port within ${BOOT_PATIENCE_S} s. Its console:
$(tail -c 4000 "$dir/console.log")"
    sleep 0.1
  done
  # The port could be someone else's: the node itself must report a finished boot (it fails its
  # boot when it cannot bind a port). In the background, so that INT and TERM act at once.
  local out rc=0
  ctl "$node" await_startup --timeout "$BOOT_PATIENCE_S" > "$dir/await.out" 2>&1 &
  wait $! || rc=$?
  out=$(cat "$dir/await.out"); rm -f "$dir/await.out"
  if [ "$rc" != 0 ]; then
    lost_a_port && return 1
    die "rabbitmqctl -n $node await_startup failed ($rc): $out
Its console:
$(tail -c 4000 "$dir/console.log")"
  fi
  if [ -n "$prom_port" ]; then
    until curl -fs -o /dev/null --max-time 5 "http://127.0.0.1:$prom_port/metrics"; do
      [ "$SECONDS" -lt "$deadline" ] || die "node $node booted, but its rabbitmq_prometheus endpoint 127.0.0.1:$prom_port/metrics does not answer. Its log: $dir/log"
      sleep 0.2
    done
  fi
}

# The node failed its boot because another process holds one of its ports.
lost_a_port() {
  grep -qE 'eaddrinuse|dist_port_already_used' "$dir/console.log" "$dir"/log/*.log 2>/dev/null
}

case "${1:-}" in
  start) [ $# -ge 2 ] || usage; shift; cmd_start "$@" ;;
  stop) [ $# -eq 2 ] || usage; cmd_stop "$2" ;;
  *) usage ;;
esac

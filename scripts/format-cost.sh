#!/usr/bin/env bash
# What ClickHouse itself spends per row to take an insert in RowBinary (what the worker sends)
# and in Native (columnar): on a machine whose cores the worker shares with ClickHouse, the
# server's CPU per row bounds throughput as much as the worker's.
#
# For each FrameWorks table in TABLES: ROWS random rows (generateRandom, strings up to 16
# bytes) of the columns the worker writes, exported once in each format; then ROUNDS inserts
# of each body, the formats alternating, into a copy of the table (same engine and ordering,
# without its views), each insert 'ROWS' rows as the worker's batches are. The server's CPU
# is read from /proc (utime + stime of the local service's process) around each insert.
#
# Usage: scripts/format-cost.sh            (ROWS=50000 ROUNDS=8 TABLES="stream_events viewer_metrics")
# Needs the local services (started here) and the release binary (`cargo build --release`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROWS=${ROWS:-50000}
ROUNDS=${ROUNDS:-8}
TABLES=${TABLES:-"stream_events viewer_metrics"}
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
BIN=${BIN:-target/release/sluice}
[ -x "$BIN" ] || { echo "format-cost: build the release binary first (cargo build --release)" >&2; exit 1; }

scripts/services.sh up >/dev/null 2>&1
pid=$(pgrep -f 'clickhouse_server.py|clickhouse-server|clickhouse server' | head -1)
[ -n "$pid" ] || { echo "format-cost: no local ClickHouse process to measure" >&2; exit 1; }
hz=$(getconf CLK_TCK)
db=sluice_format_$(date +%s)
work=$(mktemp -d)
trap 'curl -sS "$CH/" --data-binary "DROP DATABASE IF EXISTS $db" >/dev/null; rm -rf "$work"' EXIT

q() { curl -sS --fail-with-body "$CH/?database=$db" --data-binary "$1"; }
urlencode() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }
ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }

curl -sS --fail-with-body "$CH/" --data-binary "CREATE DATABASE $db" >/dev/null
CLICKHOUSE_URL=$CH CLICKHOUSE_DB=$db "$BIN" migrate >/dev/null

printf '%-16s %-10s %12s %14s %12s\n' table format "body bytes" "CPU s/M rows" "ms/insert"
for table in $TABLES; do
  # The columns without a DEFAULT: those the worker writes.
  where="database = currentDatabase() AND table = '$table' AND default_kind = ''"
  structure=$(q "SELECT arrayStringConcat(groupArray(name || ' ' || type), ', ') FROM (SELECT name, type FROM system.columns WHERE $where ORDER BY position)")
  columns=$(q "SELECT arrayStringConcat(groupArray(name), ', ') FROM (SELECT name FROM system.columns WHERE $where ORDER BY position)")
  q "CREATE TABLE ${table}_copy AS $table" >/dev/null
  q "CREATE TABLE ${table}_rows ($structure) ENGINE = Memory" >/dev/null
  # Times within the last hour and 8 tenants: the partitions of a batch of live events.
  q "INSERT INTO ${table}_rows SELECT * REPLACE (now() - rand() % 3600 AS timestamp, toUUID(concat('00000000-0000-4000-8000-00000000000', toString(rand() % 8))) AS tenant_id) FROM generateRandom('$structure', 1, 16, 4) LIMIT $ROWS" >/dev/null
  for format in RowBinary Native; do
    q "SELECT * FROM ${table}_rows FORMAT $format" >"$work/$table.$format"
    echo 0 >"$work/$table.$format.ticks"
    echo 0 >"$work/$table.$format.ms"
  done
  for _ in $(seq "$ROUNDS"); do
    for format in RowBinary Native; do
      before=$(ticks)
      start=$(date +%s%N)
      curl -sS --fail-with-body "$CH/?database=$db&query=$(urlencode "INSERT INTO ${table}_copy ($columns) FORMAT $format")" \
        --data-binary @"$work/$table.$format" >&2
      end=$(date +%s%N)
      after=$(ticks)
      echo $(( $(cat "$work/$table.$format.ticks") + after - before )) >"$work/$table.$format.ticks"
      echo $(( $(cat "$work/$table.$format.ms") + (end - start) / 1000000 )) >"$work/$table.$format.ms"
    done
  done
  for format in RowBinary Native; do
    t=$(cat "$work/$table.$format.ticks")
    ms=$(cat "$work/$table.$format.ms")
    awk -v t="$t" -v hz="$hz" -v rows="$ROWS" -v rounds="$ROUNDS" -v ms="$ms" \
      -v table="$table" -v format="$format" -v bytes="$(stat -c %s "$work/$table.$format")" \
      'BEGIN { printf "%-16s %-10s %12d %14.2f %12.0f\n", table, format, bytes, t / hz / (rows * rounds) * 1e6, ms / rounds }'
  done
done

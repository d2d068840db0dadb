#!/usr/bin/env bash
# A flame graph of the FrameWorks worker in a drain: EVENTS generator events (default 500,000)
# on 6 partitions, drained into ClickHouse and PostgreSQL by the release binary while `perf`
# samples that process alone (cpu-clock at 499 Hz, DWARF call graphs: release builds keep no
# frame pointers). inferno folds and draws the samples. Writes docs/flamegraph-drain.svg (OUT
# overrides; FOLDED=PATH keeps the folded stacks for grep and awk) and drops the run's ClickHouse and PostgreSQL databases afterwards (the topic stays,
# like the demo's).
#
# Needs `perf` (Debian's linux-perf, installed here when missing) and a kernel that lets this
# user sample its own processes (kernel.perf_event_paranoid <= 2). inferno is installed into
# .services/tools on first use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EVENTS=${EVENTS:-500000}
OUT=${OUT:-docs/flamegraph-drain.svg}
RUN_ID=$(date +%s)
CONFIG=config/demo.toml
TOOLS=.services/tools
INFERNO_VERSION=0.12.3
export KAFKA_TOPICS=sluice_flame_$RUN_ID
export KAFKA_GROUP_ID=sluice-flame-$RUN_ID
export CLICKHOUSE_DB=sluice_flame_$RUN_ID
PG_ADMIN=postgres://sluice:sluice@127.0.0.1:5432/sluice
export DATABASE_URL=postgres://sluice:sluice@127.0.0.1:5432/sluice_flame_$RUN_ID

if ! command -v perf >/dev/null; then
  echo "== installing perf (linux-perf)"
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y -q linux-perf >/dev/null
fi
if [[ ! -x $TOOLS/bin/inferno-flamegraph ]]; then
  echo "== installing inferno $INFERNO_VERSION into $TOOLS"
  cargo install --quiet --locked --root "$TOOLS" inferno --version "$INFERNO_VERSION"
fi

scripts/services.sh up
echo "== building sluice (release)"
cargo build --release --locked --bin sluice
SLUICE=target/release/sluice

work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  curl -sS --fail "http://127.0.0.1:8123/" --data-binary "DROP DATABASE IF EXISTS $CLICKHOUSE_DB" || true
  psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS sluice_flame_$RUN_ID" || true
}
trap cleanup EXIT

psql -q "$PG_ADMIN" -c "CREATE DATABASE sluice_flame_$RUN_ID"
echo "== migrate"
$SLUICE migrate --config $CONFIG
echo "== generate $EVENTS events into $KAFKA_TOPICS"
$SLUICE generate --config $CONFIG --events "$EVENTS" --partitions 6 --seed 42
echo "== run --drain under perf"
LOG_LEVEL=warn perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -o "$work/perf.data" \
  -- $SLUICE run --config $CONFIG --drain
echo "== folding $(du -h "$work/perf.data" | cut -f1) of samples"
mkdir -p "$(dirname "$OUT")"
perf script -i "$work/perf.data" 2>/dev/null | "$TOOLS/bin/inferno-collapse-perf" --all > "$work/folded"
"$TOOLS/bin/inferno-flamegraph" --minwidth 0.5 \
  --title "sluice run --drain: $EVENTS FrameWorks events into ClickHouse + PostgreSQL ($(git rev-parse --short HEAD), $(nproc) cores)" \
  --subtitle "perf cpu-clock 499 Hz, DWARF call graphs; scripts/flamegraph.sh" \
  < "$work/folded" > "$OUT"
if [[ -n ${FOLDED:-} ]]; then cp "$work/folded" "$FOLDED"; fi
echo "== wrote $OUT; where the samples were (self time, top 15 functions; per thread: threads)"
awk '{ n = $NF; $NF = ""; k = split($0, f, ";"); gsub(/ +$/, "", f[k]); self[f[k]] += n; t = f[1]; sub(/-[0-9]+$/, "", t); thread[t] += n; all += n }
     END { for (s in self) printf "%6.2f%%  %s\n", 100 * self[s] / all, s; for (t in thread) printf "%6.2f%%  threads: %s\n", 100 * thread[t] / all, t }' \
  "$work/folded" | sort -rn | awk '/threads:/ { print; next } c++ < 15'

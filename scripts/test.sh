#!/usr/bin/env bash
# Runs every test of the workspace (unit and integration, all crates) against real local
# services, which it starts itself. Exits non-zero on any failure; the last lines are
# cargo's own test summary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/services.sh up
# The four-node ClickHouse cluster (about 1.1 GiB) for the cluster tests, when the machine has
# the memory (SLUICE_CLUSTER=off skips it).
avail_kib=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
if [ "${SLUICE_CLUSTER:-auto}" != off ] && [ "${avail_kib:-0}" -ge $((4 * 1024 * 1024)) ]; then
  scripts/services.sh up cluster
  export SLUICE_CLUSTER=up
else
  echo "test.sh: ClickHouse cluster not started (SLUICE_CLUSTER=${SLUICE_CLUSTER:-auto}, $((${avail_kib:-0} / 1024)) MiB available, 4096 needed): the cluster tests are skipped"
  export SLUICE_CLUSTER=off
fi
# The GeoLite2 databases the GeoIP tests read (fetched once into .services/geoip).
SLUICE_GEOIP_DATABASE=${SLUICE_GEOIP_DATABASE:-$(scripts/geoip.sh)}
export SLUICE_GEOIP_DATABASE

# Integration tests share the services; each uses its own topics, groups and tables.
export KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:9092}
export CLICKHOUSE_URL=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
export DATABASE_URL=${DATABASE_URL:-postgres://sluice:sluice@127.0.0.1:5432/sluice}

log=$(mktemp)
# A hung test fails the run with its stacks instead of running into CI's limit.
scripts/watchdog.sh "${CARGO_TARGET_DIR:-target}" "${SLUICE_TEST_HANG_SECS:-900}" &
watchdog=$!
trap 'kill "$watchdog" 2>/dev/null; rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$rc"

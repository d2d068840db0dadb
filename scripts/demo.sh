#!/usr/bin/env bash
# The main job end to end on this machine: services up, migrate, generate 1,000,000 FrameWorks
# events, run the worker in drain mode with a live progress line, then show what landed:
# rows per table, the busiest five-minute windows by viewer reports, the top streams of
# stream_analytics, the usage totals and the viewers' top countries.
# EVENTS=N overrides the number of events. Viewer geography is on: the GeoLite2 City database
# (fetched once by scripts/geoip.sh) locates each connection's address (GEOIP_DATABASE
# overrides it; GEOIP_DATABASE= turns it off). Stream state is reduced into a fresh PostgreSQL
# database (DATABASE_URL overrides it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EVENTS=${EVENTS:-1000000}
RUN_ID=$(date +%s)
export KAFKA_TOPICS=${KAFKA_TOPICS:-analytics_events_demo_$RUN_ID}
export KAFKA_GROUP_ID=${KAFKA_GROUP_ID:-sluice-demo-$RUN_ID}
export CLICKHOUSE_DB=${CLICKHOUSE_DB:-frameworks_demo_$RUN_ID}
CONFIG=config/demo.toml

scripts/services.sh up
export GEOIP_DATABASE=${GEOIP_DATABASE-$(scripts/geoip.sh)}
if [[ -z "${DATABASE_URL:-}" ]]; then
  PG_ADMIN=postgres://sluice:sluice@127.0.0.1:5432/sluice
  psql -q "$PG_ADMIN" -c "CREATE DATABASE sluice_demo_$RUN_ID"
  export DATABASE_URL=postgres://sluice:sluice@127.0.0.1:5432/sluice_demo_$RUN_ID
fi
echo "== building sluice (release)"
cargo build --release --locked --bin sluice
SLUICE=target/release/sluice

echo "== migrate"
$SLUICE migrate --config $CONFIG
echo "== generate $EVENTS events into $KAFKA_TOPICS"
$SLUICE generate --config $CONFIG --events "$EVENTS" --partitions 6 --seed 42
echo "== run --drain"
start=$(date +%s.%N)
LOG_LEVEL=${LOG_LEVEL:-warn} $SLUICE run --config $CONFIG --drain --progress
end=$(date +%s.%N)

q() { curl -sS --fail "http://127.0.0.1:8123/?database=$CLICKHOUSE_DB" --data-binary "$1"; }
echo "== rows per table ($CLICKHOUSE_DB)"
q "SELECT table, sum(rows) AS rows FROM system.parts WHERE database = currentDatabase() AND active
   AND table NOT LIKE 'sluice_%' AND table NOT LIKE '%_states' GROUP BY table ORDER BY table
   FORMAT PrettyCompactMonoBlock"
awk -v e="$EVENTS" -v s="$start" -v t="$end" 'BEGIN { printf "== %d events in %.1f s (group join included): %.0f events/s\n", e, t - s, e / (t - s) }'
echo "== busiest five-minute windows: viewer reports (one per connected viewer and report) per stream"
q "SELECT toStartOfInterval(timestamp, INTERVAL 5 MINUTE) AS five_minutes, internal_name,
   sum(viewer_count) AS viewer_reports, uniqExact(node_id) AS nodes,
   round(avg(connection_quality), 3) AS quality, round(avg(buffer_health), 3) AS buffer
   FROM viewer_metrics GROUP BY five_minutes, internal_name
   ORDER BY viewer_reports DESC LIMIT 5 FORMAT PrettyCompactMonoBlock"
echo "== stream_analytics: top streams by peak viewers (the same streams lead above)"
psql -q "$DATABASE_URL" -c "SELECT left(tenant_id::text, 8) AS tenant, internal_name, status, current_viewers AS viewers, peak_viewers AS peak, total_connections AS connections, round(total_bandwidth_gb, 3) AS gb, node_id, last_updated FROM stream_analytics ORDER BY peak_viewers DESC, total_connections DESC LIMIT 8"
echo "== usage_records: totals per usage type (one-minute windows per tenant and partition)"
q "SELECT cluster_id, usage_type, billing_month, count() AS rows, uniqExact(tenant_id) AS tenants, formatReadableQuantity(sum(usage_value)) AS total FROM usage_records GROUP BY cluster_id, usage_type, billing_month ORDER BY usage_type FORMAT PrettyCompactMonoBlock"
echo "== viewers' top countries (connection_events located by GeoIP from connection_addr)"
q "SELECT if(country_code = '\\0\\0', '(none)', toString(country_code)) AS country,
   count() AS connects, uniqExact(connection_addr) AS addresses,
   topKIf(3)(city, city != '') AS top_cities
   FROM connection_events WHERE event_type = 'connect'
   GROUP BY country ORDER BY connects DESC LIMIT 10 FORMAT PrettyCompactMonoBlock"

#!/usr/bin/env bash
# Scale-out proof with the real services: three `sluice run` workers in one consumer group on a
# 12-partition topic of EVENTS events (default 2,000,000); one is SIGKILLed a third of the way
# through and a fourth joins. Passes when every ClickHouse table equals a clean single-worker
# run of the same records, stream_analytics and the usage sums are exact, and the group's
# offsets are committed to the end. Prints per-worker and total throughput and the pauses seen.
# The test itself is tests/scale.rs (ignored in the normal test run: it takes minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/services.sh up
SCALE_EVENTS=${EVENTS:-2000000} cargo test --release --locked --test scale -- --ignored --nocapture

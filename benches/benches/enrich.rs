//! The GeoIP enrich stage on the generator's viewer addresses (`sluice_schemas::sample::
//! viewer_addr`), against the real GeoLite2 City database (`scripts/geoip.sh`;
//! `SLUICE_GEOIP_DATABASE` overrides the path):
//! - `maxmind_lookup`: the database alone, one batched call for 10,000 distinct addresses;
//! - `stage_misses`: the stage with an empty cache (every key looked up and cached);
//! - `stage_hits`: the stage with every key cached.
//!
//! Throughput is per address. Run: `cargo bench -p sluice-benches --bench enrich`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sluice_enrich::{Enrich, Geo, Lookup, MaxMind};
use sluice_pipeline::{AsyncOperator, Health, RetryPolicy, StageContext};
use sluice_schemas::sample::{VIEWER_ADDRS, viewer_addr};

const ADDRS: u32 = 10_000;

#[derive(Clone, Default)]
struct Viewer {
    addr: String,
    country: [u8; 2],
    city: String,
    latitude: f64,
}

fn database() -> String {
    std::env::var("SLUICE_GEOIP_DATABASE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../.services/geoip/GeoLite2-City.mmdb"
        )
        .to_owned()
    })
}

fn enrich(c: &mut Criterion) {
    let path = database();
    let addrs: Vec<String> = (0..ADDRS)
        .map(|i| viewer_addr(i * (VIEWER_ADDRS / ADDRS) + i % 7))
        .collect();
    let keys: Vec<IpAddr> = addrs.iter().map(|a| a.parse().expect("address")).collect();
    let viewers: Vec<Viewer> = addrs
        .iter()
        .map(|a| Viewer {
            addr: a.clone(),
            ..Viewer::default()
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let ctx = StageContext::new("geoip", Health::new(), RetryPolicy::default());
    let stage = || {
        Enrich::new(
            MaxMind::open(&path).unwrap_or_else(|e| panic!("{e} (run scripts/geoip.sh)")),
            |v: &Viewer| v.addr.parse().ok(),
            |v, g: &Geo| {
                if let [a, b] = g.country_code.as_bytes() {
                    v.country = [*a, *b];
                }
                v.city = g.city.to_string();
                v.latitude = g.latitude.unwrap_or_default();
            },
        )
    };

    let mut group = c.benchmark_group("enrich");
    group.throughput(Throughput::Elements(ADDRS as u64));
    let geoip = MaxMind::open(&path).expect("database");
    group.bench_function("maxmind_lookup", |b| {
        b.iter(|| rt.block_on(geoip.lookup(black_box(&keys))).expect("lookup"))
    });
    group.bench_function("stage_misses", |b| {
        b.iter_batched(
            || (stage().operator(&ctx), viewers.clone()),
            |(mut op, input)| rt.block_on(op.process(input)).expect("process"),
            BatchSize::LargeInput,
        )
    });
    let warm = stage();
    let mut op = warm.operator(&ctx);
    rt.block_on(op.process(viewers.clone())).expect("warm");
    group.bench_function("stage_hits", |b| {
        b.iter_batched(
            || viewers.clone(),
            |input| rt.block_on(op.process(input)).expect("process"),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, enrich);
criterion_main!(benches);

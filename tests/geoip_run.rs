//! FrameWorks with the optional viewer geography on (`GEOIP_DATABASE`, the real GeoLite2 City
//! database that `scripts/geoip.sh` fetches): a worker SIGKILLed under steady production,
//! each time while it owns partitions and writes, leaves every table equal to a clean run
//! and `stream_analytics` exact, and every `connection_events` row holds what the database
//! says of its `connection_addr` (private addresses: nothing).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::analytics::Setup;
use common::{as_refs, assert_each_kill_replayed, command, total_rows};
use sluice_testkit::kill_while_writing;
use sluice_worker::enrich::MaxMind;

fn database() -> String {
    let path = std::env::var("SLUICE_GEOIP_DATABASE").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/.services/geoip/GeoLite2-City.mmdb"
        )
        .to_owned()
    });
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: run scripts/geoip.sh"
    );
    path
}

#[tokio::test]
async fn geoip_on_three_sigkills_leave_exact_tables_with_every_viewer_located() {
    let (mut s, producer) = Setup::new(
        20_000,
        4,
        3000,
        "batch_linger_ms = 100\nbatch_max_rows = 2000",
        400,
    )
    .await;
    s.env.push(("GEOIP_DATABASE".to_owned(), database()));
    let mut producer = producer.expect("background producer");
    let env = as_refs(&s.env);
    let mut seed = 0x9e37_79b9_u64;
    let mut logs = Vec::new();
    for round in 0..3 {
        let worker = command(&s.config, &env, &["run"], "info");
        logs.push(
            kill_while_writing(
                worker,
                round,
                &mut seed,
                Duration::from_millis(1500),
                || total_rows(s.db()),
            )
            .await,
        );
    }
    assert!(producer.wait().expect("generate").success());
    let out = command(&s.config, &env, &["run", "--drain"], "info")
        .output()
        .expect("drain");
    let drain_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "drain: {drain_log}");
    assert_each_kill_replayed(&logs, drain_log);
    s.assert_exact().await;
    let tables = s.compare_with_clean_run().await;
    assert_eq!(
        tables.got, tables.want,
        "every table equals a clean run of the same records"
    );

    // Every row's geo columns are the database's answer for its address.
    let rows: Vec<(String, String, String, f64, f64, u64)> = common::clickhouse(s.db())
        .query(
            "SELECT connection_addr, toString(country_code), city, latitude, longitude, count() \
             FROM connection_events GROUP BY ALL",
        )
        .fetch_all()
        .await
        .expect("connection rows");
    let geoip = MaxMind::open(database()).expect("database");
    let (mut located, mut total) = (0u64, 0u64);
    let mut countries: HashMap<String, u64> = HashMap::new();
    for (addr, cc, city, lat, lon, n) in &rows {
        // Disconnects carry no address: their geo columns stay empty.
        let want = match addr.parse() {
            Ok(ip) => geoip.locate(ip).expect("lookup").unwrap_or_default(),
            Err(_) => {
                assert!(addr.is_empty(), "{addr}");
                Default::default()
            }
        };
        let cc = cc.trim_end_matches('\0');
        assert_eq!(
            (cc, city.as_str(), *lat, *lon),
            (
                &*want.country_code,
                &*want.city,
                want.latitude.unwrap_or_default(),
                want.longitude.unwrap_or_default()
            ),
            "{addr}"
        );
        if addr.is_empty() {
            continue;
        }
        total += n;
        if !cc.is_empty() {
            located += n;
            *countries.entry(cc.to_owned()).or_default() += n;
        }
    }
    assert!(total > 1_000, "{total} connects");
    assert!(
        located * 100 >= total * 95,
        "{located} of {total} viewers located"
    );
    assert!(countries.len() >= 20, "countries: {countries:?}");
    for l in logs {
        let _ = std::fs::remove_file(l);
    }
    s.finish().await;
}

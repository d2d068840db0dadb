//! `sluice bench` end to end on a small topic, against the real broker, ClickHouse and
//! PostgreSQL: every phase runs on the same events, ceiling B inserts exactly the rows the
//! worker wrote, the live worker's sinks time the probe's records, and the reports say where
//! and what ran.

use std::process::Command;

mod common;

#[tokio::test]
async fn bench_measures_every_phase_on_the_same_events_and_writes_its_reports() {
    let dir = std::env::temp_dir().join(sluice_testkit::unique("sluice_bench"));
    let markdown = dir.join("BENCHMARKS.md");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "bench",
            "--events",
            "20000",
            "--partitions",
            "4",
            "--probe-secs",
            "3",
        ])
        .arg("--out")
        .arg(&dir)
        .arg("--markdown")
        .arg(&markdown)
        .env("KAFKA_BROKERS", sluice_testkit::brokers())
        .env("DATABASE_URL", sluice_testkit::postgres_url())
        .env("LOG_LEVEL", "warn")
        .output()
        .expect("run sluice bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for phase in [
        "ceiling A: plain consumer",
        "worker → ClickHouse ",
        "ceiling B: pre-encoded inserts",
        "worker → ClickHouse + PostgreSQL",
        "latency at ",
    ] {
        assert!(stdout.contains(phase), "no {phase:?} in\n{stdout}");
    }

    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("latest.json")).expect("latest.json"),
    )
    .expect("JSON report");
    let phases = report["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 4, "{report:#}");
    for p in phases {
        assert_eq!(p["events"], 20000, "{p}");
        assert!(p["secs"].as_f64().unwrap_or(0.0) > 0.0, "{p}");
        assert!(p["cpu_secs"].as_f64().unwrap_or(0.0) > 0.0, "{p}");
        assert!(p["peak_rss"].as_u64().unwrap_or(0) > 1 << 20, "{p}");
    }
    // Ceiling A and the worker phases know how much of their time the group join took.
    for i in [0, 1, 3] {
        let (join, secs) = (phases[i]["join_secs"].as_f64(), phases[i]["secs"].as_f64());
        assert!(
            matches!((join, secs), (Some(j), Some(s)) if j > 0.0 && j < s),
            "{}",
            phases[i]
        );
    }
    let rows = |i: usize| phases[i]["rows"].as_u64().unwrap_or(0);
    assert!(
        rows(1) >= 20000,
        "every event makes at least one row: {report:#}"
    );
    assert_eq!(rows(2), rows(1), "ceiling B inserts the worker's rows");
    // Late usage events make extra usage rows depending on timing; the other tables (count
    // and content) and the usage totals must be the same in both worker phases.
    assert_eq!(
        common::table_digests("sluice_bench_w1").await,
        common::table_digests("sluice_bench_w2").await,
        "the reducer phase writes the same rows"
    );
    let (u1, u2): (f64, f64) = common::clickhouse("default")
        .query("SELECT assumeNotNull((SELECT sum(usage_value) FROM sluice_bench_w1.usage_records)), assumeNotNull((SELECT sum(usage_value) FROM sluice_bench_w2.usage_records))")
        .fetch_one()
        .await
        .expect("usage");
    assert!(u1 > 0.0 && u1 == u2, "usage totals {u1} and {u2}");
    assert!(
        phases[0]["bytes"].as_u64().unwrap_or(0) > 20000 * 100,
        "ceiling A counts the bytes it read: {report:#}"
    );
    // The live worker's sinks timed the probe's records: the slowest table's figures.
    let latency = &report["latency"];
    assert!(latency["samples"].as_u64().unwrap_or(0) >= 4, "{latency}");
    let sink = latency["sink"].as_str().unwrap_or_default();
    assert!(
        sluice_schemas::EVENT_TABLES.contains(&sink),
        "a table not fed by windows: {latency}"
    );
    let ms = |k: &str| latency[k].as_f64().unwrap_or(f64::NAN);
    assert!(
        0.0 < ms("p50_ms") && ms("p50_ms") <= ms("p99_ms") && ms("p99_ms") <= ms("max_ms"),
        "{latency}"
    );
    assert!(ms("max_ms") < 30_000.0, "{latency}");

    let md = std::fs::read_to_string(&markdown).expect("BENCHMARKS.md");
    for needle in [
        "-- bench --events 20000",
        "- commit: `",
        "cores",
        "| worker peak RSS ≤ 256 MB |",
        "| p99 latency ≤ linger + 500 ms = 1000 ms",
    ] {
        assert!(md.contains(needle), "no {needle:?} in\n{md}");
    }
    // The charts: beside the JSON, and beside the report that links them.
    for chart in ["bench-phases.svg", "bench-latency.svg"] {
        assert!(
            md.contains(&format!("](docs/bench/{chart})")),
            "{chart} not linked in\n{md}"
        );
        let linked = std::fs::read_to_string(dir.join("docs/bench").join(chart)).expect(chart);
        let beside = std::fs::read_to_string(dir.join(chart)).expect(chart);
        assert!(linked.starts_with("<svg") && linked == beside, "{chart}");
    }
    let phases_svg = std::fs::read_to_string(dir.join("bench-phases.svg")).expect("phases");
    for p in phases {
        let name = p["name"].as_str().unwrap_or_default();
        assert!(phases_svg.contains(name), "{name} not charted");
    }
    let latency_svg = std::fs::read_to_string(dir.join("bench-latency.svg")).expect("latency");
    let p99 = format!("{:.0}", ms("p99_ms"));
    assert!(latency_svg.contains(&p99), "p99 {p99} not charted");
    let _ = std::fs::remove_dir_all(&dir);
}

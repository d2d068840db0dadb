//! `webshop bench`: the shell's benchmark on this pipeline's own workload, against the real
//! services. Its reducer is part of it, so its worker phase is the one with PostgreSQL, and
//! ceiling B inserts exactly the rows that phase wrote.

use std::process::Command;

#[test]
fn bench_runs_on_the_pipelines_own_workload() {
    let dir = std::env::temp_dir().join(sluice_testkit::unique("webshop_bench"));
    let out = Command::new(env!("CARGO_BIN_EXE_webshop"))
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
        .arg(dir.join("BENCHMARKS.md"))
        .arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/webshop.toml"))
        .env("KAFKA_BROKERS", sluice_testkit::brokers())
        .env("DATABASE_URL", sluice_testkit::postgres_url())
        .env("LOG_LEVEL", "warn")
        .output()
        .expect("run webshop bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("latest.json")).expect("latest.json"),
    )
    .expect("JSON report");
    let phases: Vec<(&str, u64)> = report["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["rows"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        phases,
        [
            ("ceiling A: plain consumer", 0),
            ("worker → ClickHouse + PostgreSQL", 20_000),
            ("ceiling B: pre-encoded inserts", 20_000),
        ],
        "one row per record, and no phase without PostgreSQL: {report:#}"
    );
    assert_eq!(report["latency"]["sink"], "shop_orders", "{report:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

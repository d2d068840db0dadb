//! A pipeline as a process, against the real broker: `examples/custom_operator.rs` scrubs
//! what it reads, and a SIGTERM in mid-stream flushes, commits and loses nothing.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sluice_testkit::{brokers, committed_offsets, create_topic, produce, unique};

/// The example binary, built by `cargo test` next to the package's binaries.
fn example_bin() -> PathBuf {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_sluice"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let path = bin_dir.join("examples").join("custom_operator");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test` for the whole package (it builds the examples), or `cargo build --examples`",
        path.display()
    );
    path
}

fn spawn_example(topic: &str, group: &str, out: &Path, drain: bool, sink_delay_ms: u64) -> Child {
    Command::new(example_bin())
        .env("KAFKA_BROKERS", brokers())
        .env("TOPIC", topic)
        .env("GROUP", group)
        .env("OUT", out)
        .env("DRAIN", if drain { "1" } else { "0" })
        .env("SINK_DELAY_MS", sink_delay_ms.to_string())
        .env("LOG_LEVEL", "warn")
        // Tansu lets a group form after half the session timeout; keep joins short in tests.
        .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
        .spawn()
        .expect("start example")
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output lines as (partition, offset, value).
fn read_lines(path: &Path) -> Vec<(i32, i64, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let p = parts
                .next()
                .and_then(|v| v.parse().ok())
                .expect("partition");
            let o = parts.next().and_then(|v| v.parse().ok()).expect("offset");
            (p, o, parts.next().unwrap_or_default().to_owned())
        })
        .collect()
}

fn offsets_by_partition(lines: &[(i32, i64, String)]) -> BTreeMap<i32, Vec<i64>> {
    let mut m: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (p, o, _) in lines {
        m.entry(*p).or_default().push(*o);
    }
    m.values_mut().for_each(|v| v.sort_unstable());
    m
}

fn tmp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(unique(name))
}

#[tokio::test]
async fn custom_operator_example_scrubs_every_record() {
    const N: usize = 2_000;
    const P: i32 = 2;
    let (topic, group, out) = (
        unique("ex_scrub"),
        unique("ex_scrub_group"),
        tmp_file("scrubbed"),
    );
    create_topic(&topic, P).await;
    produce(&topic, P, N, |i| {
        format!(
            "login {i} by user{i}@example.com from 10.0.{}.1 ok",
            i % 256
        )
        .into_bytes()
    });

    let mut child = spawn_example(&topic, &group, &out, true, 0);
    assert!(wait_exit(&mut child, Duration::from_secs(120)).success());

    let lines = read_lines(&out);
    assert_eq!(lines.len(), N);
    let values: HashSet<&str> = lines.iter().map(|(_, _, v)| v.as_str()).collect();
    for i in 0..N {
        let expected = format!("login {i} by [email] from [ip] ok");
        assert!(values.contains(expected.as_str()), "missing {expected:?}");
    }
    assert_eq!(
        committed_offsets(&group, &topic, P),
        (0..P).map(|p| (p, (N / P as usize) as i64)).collect()
    );
    let _ = std::fs::remove_file(out);
}

#[tokio::test]
async fn sigterm_mid_stream_flushes_commits_and_loses_nothing() {
    // More than the stages hold in flight (which a graceful stop still writes).
    const N: usize = 100_000;
    const P: i32 = 4;
    let (topic, group, out) = (unique("ex_term"), unique("ex_term_group"), tmp_file("term"));
    create_topic(&topic, P).await;
    produce(&topic, P, N, |i| format!("record {i}").into_bytes());

    // 500 records per 50 ms: the run is still mid-stream when the signal arrives.
    let mut child = spawn_example(&topic, &group, &out, false, 50);
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_lines(&out).len() < 3_000 {
        assert!(Instant::now() < deadline, "the worker wrote too little");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = wait_exit(&mut child, Duration::from_secs(30));
    assert!(exit.success(), "graceful exit after SIGTERM, got {exit}");

    let first = read_lines(&out);
    assert!(first.len() < N, "stopped mid-stream");
    let committed = committed_offsets(&group, &topic, P);
    let first_offsets = offsets_by_partition(&first);
    for p in 0..P {
        let c = committed.get(&p).copied().unwrap_or(0);
        assert_eq!(
            first_offsets.get(&p).cloned().unwrap_or_default(),
            (0..c).collect::<Vec<_>>(),
            "partition {p}: written == committed"
        );
    }

    // A restart drains the rest: together every record exactly once.
    let mut child = spawn_example(&topic, &group, &out, true, 0);
    assert!(wait_exit(&mut child, Duration::from_secs(120)).success());
    let all = read_lines(&out);
    assert_eq!(all.len(), N, "no record lost or written twice");
    let distinct: HashSet<(i32, i64)> = all.iter().map(|(p, o, _)| (*p, *o)).collect();
    assert_eq!(distinct.len(), N);
    let _ = std::fs::remove_file(out);
}

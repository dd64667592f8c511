//! The `worker` binary as a user runs it: `worker bench --json` on this machine, and the
//! `--memory-limit` parsing that `bench` and `join` share. No timing is asserted: the figures
//! depend on the machine and its load, so only their sanity is.

use std::process::{Command, Output};

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .output()
        .expect("the worker binary runs")
}

fn field(json: &serde_json::Value, name: &str) -> f64 {
    json[name]
        .as_f64()
        .unwrap_or_else(|| panic!("`{name}` is not a number in {json}"))
}

#[test]
fn bench_json_reports_sane_figures() {
    let output = worker(&["bench", "--json", "--threads", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "worker bench failed: {stderr}");
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("worker bench --json prints JSON");
    assert_eq!(json["backend"], "cpu");
    assert_eq!(json["threads"], 1);

    let total = json["total_memory_bytes"]
        .as_u64()
        .expect("total is an integer");
    let available = json["available_memory_bytes"]
        .as_u64()
        .expect("available is an integer");
    let budget = json["memory_budget_bytes"]
        .as_u64()
        .expect("budget is an integer");
    assert!(total > 0);
    assert!(budget <= available && available <= total, "{json}");

    let bandwidth = field(&json, "memory_bandwidth_bytes_per_s");
    assert!(
        (100e6..10e12).contains(&bandwidth),
        "bandwidth {bandwidth} B/s"
    );
    for name in [
        "qmatmul_decode_bytes_per_s",
        "qmatmul_decode_cached_flops_per_s",
        "qmatmul_prefill_flops_per_s",
    ] {
        let rate = field(&json, name);
        assert!(rate.is_finite() && rate > 0.0, "`{name}` = {rate}");
    }
    assert!(field(&json, "measured_ms") > 0.0);
}

#[test]
fn bench_memory_limit_caps_the_budget() {
    let output = worker(&[
        "bench",
        "--json",
        "--threads",
        "1",
        "--memory-limit",
        "64MiB",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        json["memory_budget_bytes"].as_u64().unwrap() <= 64 << 20,
        "{json}"
    );
}

#[test]
fn bench_prints_a_table() {
    let output = worker(&["bench", "--threads", "1"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    for label in [
        "memory budget",
        "memory bandwidth",
        "Q4_1 decode",
        "Q4_1 prefill",
    ] {
        assert!(table.contains(label), "no `{label}` in:\n{table}");
    }
}

#[test]
fn memory_limit_rejects_a_bad_size() {
    for command in ["bench", "join"] {
        let output = worker(&[command, "--memory-limit", "4XB"]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("unknown unit `XB`"), "{command}: {stderr}");
    }
}

#[test]
fn join_without_a_token_says_where_to_get_one() {
    let output = worker(&["join", "--coordinator", "127.0.0.1:9", "--memory-limit", "4GiB"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("a join token is required") && stderr.contains("coordinator serve"), "{stderr}");
}

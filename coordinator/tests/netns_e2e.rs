//! End-to-end across three test hosts in network namespaces (examples/netns_cluster.sh: a
//! bridge, one link per host with 2 ms of delay on what leaves it and a 1 Gbit/s rate —
//! `tc netem`, or on kernels without sch_netem examples/delay_link.py and tbf): the workers
//! find the coordinator by mDNS with no address given, their slices cross the network, and
//! a chat completion equals the single-machine answer.
//!
//! Needs root and iproute2 (CI runs as root); set POTLUCK_SKIP_NETNS=1 to skip elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;

fn model_path() -> PathBuf {
    std::env::var_os("POTLUCK_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    })
}

const CHAT: &str = r#"{"model":"any","max_tokens":48,"temperature":0,"messages":[{"role":"user","content":"Say hello to the potluck cluster in one sentence."}]}"#;

/// The same chat on one machine (no cluster), for comparison.
fn single_machine_answer(bin: &Path) -> String {
    let mut child = Command::new(bin.join("coordinator"))
        .args(["serve", "--no-cluster", "--listen", "127.0.0.1:0", "--threads", "1", "--model"])
        .arg(model_path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let address = loop {
        let line = lines.next().expect("coordinator exited").unwrap();
        if let Some(rest) = line.split(" on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "300", &format!("http://{address}/v1/chat/completions")])
        .args(["-H", "Content-Type: application/json", "-d", CHAT])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(out.status.success(), "single-machine chat failed");
    content(&String::from_utf8_lossy(&out.stdout))
}

fn content(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    v["choices"][0]["message"]["content"].as_str().expect("a chat answer").to_string()
}

/// The two demos share the machine's CPUs; run one at a time (failure detection is timed).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `examples/netns_cluster.sh demo` with its own namespaces and subnet; `None` when
/// POTLUCK_SKIP_NETNS=1.
fn run_demo(tag: u32, coord_args: &str, extra_env: &[(&str, &str)]) -> Option<(std::process::Output, PathBuf)> {
    if std::env::var_os("POTLUCK_SKIP_NETNS").is_some_and(|v| v == "1") {
        eprintln!("POTLUCK_SKIP_NETNS=1: skipped");
        return None;
    }
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    assert!(is_root, "network namespaces need root (set POTLUCK_SKIP_NETNS=1 to skip this test)");
    let bin = Path::new(env!("CARGO_BIN_EXE_coordinator")).parent().unwrap().to_path_buf();
    assert!(bin.join("worker").exists(), "build the workspace first (cargo build --workspace)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/netns_cluster.sh");
    let id = std::process::id() % 10_000 * 10 + tag;
    let mut command = Command::new("bash");
    command
        .arg(&script)
        .arg("demo")
        .env("PLK_PREFIX", format!("plke{id}"))
        .env("PLK_SUBNET", format!("10.{}.{}", 100 + id % 100, (id / 100) % 250))
        .env("POTLUCK_BIN_DIR", &bin)
        .env("POTLUCK_MODEL", model_path())
        .env("PLK_READY_TIMEOUT_S", "240")
        .env("PLK_COORD_ARGS", coord_args);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    Some((command.output().expect("running examples/netns_cluster.sh"), bin))
}

/// The hosts' links carry a home LAN's latency: 2 ms on what leaves each host, so at least
/// 4 ms from one host to another and back (the demo measures it before the cluster starts).
fn assert_link_is_delayed(stdout: &str) {
    let line = stdout.lines().find_map(|l| l.strip_prefix("link round trip coord -> w1: ")).expect("the demo prints the link's round trip");
    let ms: f64 = line.trim_end_matches(" ms").parse().unwrap_or_else(|_| panic!("not a round trip: {line}"));
    assert!(ms >= 4.0, "the links add 2 ms each way, but the round trip is {ms} ms");
    eprintln!("link round trip coord -> w1: {ms} ms");
}

#[test]
fn three_hosts_find_each_other_by_mdns_and_answer_like_one_machine() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Both workers hold layers (split by memory); f32 activations are bit-exact with one machine.
    let Some((out, bin)) = run_demo(1, "--no-local-layers --planner proportional --activation-dtype f32 --threads 1", &[]) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    assert_link_is_delayed(&stdout);
    let health_line = stdout.lines().find_map(|l| l.strip_prefix("health: ")).expect("the demo prints /health");
    let health: serde_json::Value = serde_json::from_str(health_line).unwrap();
    let stages = health["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "both workers hold layers: {health}");
    for node in health["nodes"].as_array().unwrap() {
        assert!(node["address"].as_str().unwrap().starts_with("10."), "workers joined over the test network: {health}");
    }
    assert!(health["cluster"]["weight_bytes_sent"].as_u64().unwrap() > 50 << 20, "the slices crossed the network: {health}");
    let answer = stdout.lines().rev().find(|l| l.contains("\"choices\"")).expect("a chat completion");
    let cluster_answer = content(answer);
    assert_eq!(cluster_answer, single_machine_answer(&bin), "the cluster answers exactly as one machine");
    eprintln!("cluster answer: {cluster_answer:?}");
}

/// Three stages (the coordinator and both workers); one worker's cable is pulled 20 tokens
/// into a streamed greedy completion. The coordinator declares it gone, re-plans over the
/// two hosts left, and the stream finishes with exactly the undisturbed tokens.
#[test]
fn a_link_cut_mid_stream_changes_no_token() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((out, _)) = run_demo(
        2,
        "--planner proportional --activation-dtype f32 --threads 1",
        &[("PLK_CUT_LINK", "w2"), ("PLK_WORKER_ARGS", "--threads 1")],
    ) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the link-cut demo failed:\n{stdout}\n{stderr}");
    let health_line = stdout.lines().find_map(|l| l.strip_prefix("health: ")).expect("the demo prints /health");
    let health: serde_json::Value = serde_json::from_str(health_line).unwrap();
    assert_eq!(health["stages"].as_array().unwrap().len(), 3, "three stages before the cut: {health}");
    let resumed = stdout.lines().find(|l| l.contains("identical to the undisturbed run")).expect("the client's verdict");
    eprintln!("{resumed}");
    let after_line = stdout.lines().find_map(|l| l.strip_prefix("health after: ")).expect("the demo prints /health after");
    let after: serde_json::Value = serde_json::from_str(after_line).unwrap();
    assert_eq!(after["stages"].as_array().unwrap().len(), 2, "re-planned over the two hosts left: {after}");
}

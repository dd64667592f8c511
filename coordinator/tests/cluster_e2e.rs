//! End-to-end cluster tests with the real model: a `coordinator serve` process and `worker
//! join` processes on loopback, talking QUIC to each other, driven through the OpenAI API.
//!
//! The worker binary is the workspace's own (`target/<profile>/worker`, built beside the
//! coordinator by `cargo build --workspace`, which scripts/test.sh runs first).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "e2e-test-token-0123456789";

fn model_path() -> PathBuf {
    let path = std::env::var_os("POTLUCK_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "model missing at {}: run `coordinator fetch-model` or set POTLUCK_MODEL", path.display());
    path
}

fn worker_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_coordinator")).with_file_name("worker");
    assert!(path.exists(), "{} missing: run `cargo build --workspace` first (scripts/test.sh does)", path.display());
    path
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("potluck-cluster-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process killed when dropped, with its output collected for failure messages.
struct Process {
    name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn spawn(name: &str, command: &mut Command) -> Process {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let output = output.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{name}] {line}");
                    output.lock().unwrap().push(line);
                }
            });
        }
        Process { name: name.to_string(), child, output }
    }

    fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.output.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "{}: no line containing {needle:?} within {timeout:?}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output_contains(&self, needle: &str) -> bool {
        self.output.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {timeout:?}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Coordinator {
    process: Process,
    http: String,
    cluster: String,
}

fn start_coordinator(dir: &Path, extra: &[&str]) -> Coordinator {
    start_coordinator_on(dir, "127.0.0.1:0", extra)
}

fn start_coordinator_on(dir: &Path, cluster_listen: &str, extra: &[&str]) -> Coordinator {
    start_coordinator_with(dir, &model_path(), cluster_listen, extra)
}

fn start_coordinator_with(dir: &Path, model: &Path, cluster_listen: &str, extra: &[&str]) -> Coordinator {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--cluster-listen", cluster_listen, "--threads", "1"])
        .args(["--token", TOKEN, "--model"])
        .arg(model)
        .args(extra)
        .env("POTLUCK_CONFIG_DIR", dir.join("coordinator-config"))
        .env_remove("POTLUCK_API_KEY")
        .env_remove("POTLUCK_TOKEN");
    let process = Process::spawn("coordinator", &mut command);
    let http = http_address(&process);
    let line = process.wait_for_line("cluster endpoint on ", Duration::from_secs(60));
    let cluster = line.split("cluster endpoint on ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    Coordinator { process, http, cluster }
}

fn start_worker(dir: &Path, name: &str, coordinator: &Coordinator, token: &str, extra: &[&str]) -> Process {
    let mut command = Command::new(worker_binary());
    command
        .args(["join", "--coordinator", &coordinator.cluster, "--token", token, "--name", name, "--threads", "1"])
        .args(["--listen", "127.0.0.1:0", "--identity"])
        .arg(dir.join(format!("{name}.key")))
        .arg("--cache-dir")
        .arg(dir.join(format!("{name}-cache")))
        .args(extra)
        .env_remove("POTLUCK_TOKEN");
    Process::spawn(name, &mut command)
}

/// A coordinator alone (`--no-cluster`): the single-machine answer to compare with.
fn start_single(dir: &Path) -> (Process, String) {
    start_single_with(dir, &model_path())
}

fn start_single_with(dir: &Path, model: &Path) -> (Process, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--no-cluster", "--threads", "1", "--model"])
        .arg(model)
        .env("POTLUCK_CONFIG_DIR", dir.join("single-config"))
        .env_remove("POTLUCK_API_KEY");
    let process = Process::spawn("single", &mut command);
    let http = http_address(&process);
    (process, http)
}

/// The HTTP address a starting coordinator prints.
fn http_address(process: &Process) -> String {
    let line = process.wait_for_line(" on http://", Duration::from_secs(120));
    line.split(" on http://").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
}

/// GET `path` over plain HTTP/1.1 (no client library needed for a status page): the body.
fn get_text(address: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").map_or_else(String::new, |(_, body)| body.to_string())
}

fn get_json(address: &str, path: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(address, path)).unwrap_or(serde_json::Value::Null)
}

/// Waits until `/health` shows `n` stages, all on workers, and every node ready.
fn wait_for_stages(coordinator: &Coordinator, n: usize, timeout: Duration) -> serde_json::Value {
    wait_for_plan(coordinator, n, false, timeout)
}

/// Waits until `/health` shows `n` stages with every live worker ready; the first stage on
/// the coordinator when `coordinator_first`, else every stage on a worker.
fn wait_for_plan(coordinator: &Coordinator, n: usize, coordinator_first: bool, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let health = get_json(&coordinator.http, "/health");
        let stages = health["stages"].as_array().map_or(0, Vec::len);
        let ready = health["nodes"].as_array().is_some_and(|nodes| {
            let live: Vec<_> = nodes.iter().filter(|n| !n["state"].as_str().unwrap_or("").starts_with("gone")).collect();
            !live.is_empty() && live.iter().all(|n| n["state"] == "ready")
        });
        let placed = health["stages"].as_array().is_some_and(|s| {
            s.iter().enumerate().all(|(i, s)| (s["node_id"] == "coordinator") == (coordinator_first && i == 0))
        });
        if stages == n && ready && placed {
            return health;
        }
        assert!(Instant::now() < deadline, "the cluster did not reach {n} ready stages within {timeout:?}: {health}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_python(script: &str, base_url: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("python3")
        .arg(root.join("tests/e2e").join(script))
        .arg(format!("http://{base_url}"))
        .arg(root.join("tests/fixtures/smollm2-q4_1-llamacpp.json"))
        .status()
        .expect("running python3");
    assert!(status.success(), "{script} failed against the cluster");
}

#[test]
fn two_workers_on_loopback_answer_exactly_as_one_machine() {
    let dir = temp_dir("two-workers");
    // The coordinator keeps no layers and splits by memory, so each worker holds half.
    // The default activation type: what this test proves must hold with defaults.
    let coordinator = start_coordinator(&dir, &["--workers", "2", "--no-local-layers", "--planner", "proportional"]);
    let _w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let _w2 = start_worker(&dir, "w2", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let health = wait_for_stages(&coordinator, 2, Duration::from_secs(180));
    let stages = health["stages"].as_array().unwrap();
    let (a, b) = (&stages[0]["layers"], &stages[1]["layers"]);
    assert_eq!(a[0], 0, "{health}");
    assert_eq!(a[1], b[0], "contiguous: {health}");
    assert_eq!(b[1], 30, "{health}");
    assert!(health["cluster"]["weight_bytes_sent"].as_u64().unwrap() > 50 << 20, "the slices were streamed: {health}");
    // The join command is shown without the token: the status pages need no key to read.
    assert!(health["cluster"]["join_command"].as_str().unwrap().contains("--token <join token>"), "{health}");
    assert!(!health.to_string().contains(TOKEN), "the join token leaks through /health: {health}");
    run_python("cluster_client.py", &coordinator.http);
    // A long prompt (several prefill chunks, sent one behind the other through the stages)
    // answers exactly as one machine does.
    let single = start_single(&dir);
    let story = (0..60).map(|i| format!("On day {i} the travellers walked further along the river.")).collect::<String>();
    let body = serde_json::json!({"prompt": story, "max_tokens": 24, "temperature": 0, "logprobs": 1, "ignore_eos": true}).to_string();
    let (status, on_cluster) = post(&coordinator.http, "/v1/completions", &body);
    assert_eq!(status, 200, "{on_cluster}");
    let (_, alone) = post(&single.1, "/v1/completions", &body);
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s.split_once("\r\n\r\n").unwrap().1).unwrap();
    let (on_cluster, alone) = (parse(&on_cluster), parse(&alone));
    assert!(on_cluster["usage"]["prompt_tokens"].as_u64().unwrap() > 600, "{on_cluster}");
    assert_eq!(on_cluster["choices"][0]["text"], alone["choices"][0]["text"], "a long prompt on 2 stages vs one machine");
    assert_eq!(on_cluster["choices"][0]["logprobs"], alone["choices"][0]["logprobs"]);
    drop(single);
    // The whole client suite (errors, chat, logprobs, seeds, concurrency) on the cluster too.
    run_python("openai_client_test.py", &coordinator.http);
    // `coordinator status` draws the same cluster in the terminal.
    let out = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["status", "--url", &format!("http://{}", coordinator.http)])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "coordinator status failed: {}", String::from_utf8_lossy(&out.stderr));
    let layers = |s: &serde_json::Value| format!("{}..{}", s["layers"][0], s["layers"][1]);
    for needle in ["w1", "w2", "ready", "workers (2)", &layers(&stages[0]), &layers(&stages[1])] {
        assert!(table.contains(needle), "{needle:?} missing from `coordinator status`:\n{table}");
    }
    // And /metrics, for Prometheus: two stages, two ready workers, their steps.
    std::thread::sleep(Duration::from_millis(1500)); // a heartbeat after the requests above
    // What each worker really holds, beside its budget and its plan (VmRSS ≤ VmHWM).
    let health = get_json(&coordinator.http, "/health");
    for node in health["nodes"].as_array().unwrap() {
        let (now, peak) = (node["resident_bytes"].as_u64().unwrap_or(0), node["peak_resident_bytes"].as_u64().unwrap_or(0));
        assert!(now > node["weight_bytes"].as_u64().unwrap() / 2 && peak >= now, "resident memory from the heartbeat: {node}");
    }
    assert!(health["cluster"]["coordinator_peak_resident_bytes"].as_u64().unwrap_or(0) > 0, "{health}");
    let metrics = get_text(&coordinator.http, "/metrics");
    for needle in [
        "potluck_nodes 2\n",
        "potluck_workers{state=\"ready\"} 2\n",
        "potluck_worker_steps_total{node=\"w1\"} ",
        "potluck_stage_predicted_milliseconds{node=\"w2\"",
    ] {
        assert!(metrics.contains(needle), "{needle:?} missing from /metrics:\n{metrics}");
    }
    // Measured: each stage's time per step, and each hop's round trip (stage 0 → stage 1,
    // and stage 1 back to the coordinator with the sampled tokens).
    let name = |i: usize| stages[i]["name"].as_str().unwrap().to_owned();
    for needle in [
        format!("potluck_stage_measured_milliseconds{{node=\"{}\"}} ", name(0)),
        format!("potluck_stage_measured_milliseconds{{node=\"{}\"}} ", name(1)),
        format!("potluck_hop_rtt_milliseconds{{from=\"{}\",to=\"{}\"}} ", name(0), name(1)),
        format!("potluck_hop_rtt_milliseconds{{from=\"{}\",to=\"coordinator\"}} ", name(1)),
    ] {
        assert!(metrics.contains(&needle), "{needle:?} missing from /metrics:\n{metrics}");
    }
    let steps: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("potluck_worker_steps_total{node=\"w1\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(steps > 0, "w1 reported its steps: {metrics}");
    // The dashboard in a real browser: both stages with their layer ranges, and a live
    // tokens/s figure that moves while a request streams. The screenshot is CI's artifact.
    let expected_layers = stages.iter().map(|s| format!("{}-{}", s["layers"][0], s["layers"][1])).collect::<Vec<_>>().join(",");
    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/artifacts/dashboard.png");
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/dashboard_browser.py"))
        .args(["--url", &format!("http://{}", coordinator.http), "--expect-stages", "2", "--expect-layers", &expected_layers])
        .args(["--stream-prompt", "Count from 1 to 100, one number per line:", "--stream-max-tokens", "200", "--timeout", "180"])
        .args(["--chat", "What is the capital of France?", "--drain", &name(1)])
        .arg("--screenshot")
        .arg(&screenshot)
        .output()
        .expect("running python3");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the dashboard test failed (is Debian's chromium installed?):\n{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_default();
    let names: Vec<&str> = summary["stages"].as_array().map_or(vec![], |s| s.iter().filter_map(|s| s["node"].as_str()).collect());
    assert_eq!(names, [name(0), name(1)], "the page names the stages' workers, in order: {stdout}");
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000), "a screenshot at {}", screenshot.display());
    assert!(summary["chat_answer"].as_str().is_some_and(|a| !a.is_empty()), "the chat box answered: {stdout}");
    // Drained from the page: the worker shut down (exit 0) and the cluster re-planned onto w1.
    assert_eq!(summary["drained"], name(1), "{stdout}");
    let health = wait_for_stages(&coordinator, 1, Duration::from_secs(60));
    assert_eq!(health["stages"][0]["name"], name(0), "{health}");
    println!("dashboard screenshot: {}", screenshot.display());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_token_is_refused_and_a_restarted_worker_loads_from_its_cache() {
    let dir = temp_dir("token-cache");
    let coordinator = start_coordinator(&dir, &["--workers", "1", "--no-local-layers", "--activation-dtype", "f32"]);

    // No token and a wrong token: refused with a clear message on both sides, nothing served.
    let mut missing = Process::spawn(
        "no-token",
        Command::new(worker_binary()).args(["join", "--coordinator", &coordinator.cluster]).env_remove("POTLUCK_TOKEN"),
    );
    assert!(!missing.wait_exit(Duration::from_secs(30)).success());
    assert!(missing.output_contains("a join token is required"));
    let mut wrong = start_worker(&dir, "intruder", &coordinator, "not-the-right-token", &[]);
    assert!(!wrong.wait_exit(Duration::from_secs(60)).success(), "a worker with a wrong token must fail");
    assert!(wrong.output_contains("refused"), "the worker says it was refused");
    coordinator.process.wait_for_line("join token proof did not verify", Duration::from_secs(10));
    let health = get_json(&coordinator.http, "/health");
    assert_eq!(health["cluster"]["weight_bytes_sent"], 0, "no weights to a refused worker: {health}");

    // The right token: the slice is streamed, then the model answers through the worker.
    let mut worker = start_worker(&dir, "w1", &coordinator, TOKEN, &[]);
    wait_for_stages(&coordinator, 1, Duration::from_secs(180));
    let health = get_json(&coordinator.http, "/health");
    assert_eq!(health["stages"][0]["name"], "w1", "{health}");
    let sent = health["cluster"]["weight_bytes_sent"].as_u64().unwrap();
    assert!(sent > 50 << 20, "the whole model went to the worker: {health}");
    run_python("cluster_client.py", &coordinator.http);

    // Restart the worker with the same identity and cache: no slice bytes are sent again.
    let _ = worker.child.kill();
    let _ = worker.child.wait();
    let worker = start_worker(&dir, "w1", &coordinator, TOKEN, &[]);
    worker.wait_for_line("worker: ready", Duration::from_secs(120));
    wait_for_stages(&coordinator, 1, Duration::from_secs(120));
    let health = get_json(&coordinator.http, "/health");
    assert_eq!(health["cluster"]["weight_bytes_sent"].as_u64().unwrap(), sent, "a restart loads from the cache: {health}");
    assert!(worker.output_contains("0.0 MiB received"), "the worker reports nothing received");
    run_python("cluster_client.py", &coordinator.http);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The committed exactness fixture (tests/fixtures/exactness-logprobs.json: raw and chat
/// prompts with one machine's greedy tokens, log-probabilities and top alternatives). It was
/// recorded with the AVX2 kernels (AVX-512 gives the same bits); on a CPU without them the
/// engine's scalar kernels round differently, so there the test records one machine's answers
/// afresh and holds the cluster to those.
fn exactness_fixture(dir: &Path) -> PathBuf {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/exactness-logprobs.json");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        return committed;
    }
    let fresh = dir.join("exactness-logprobs.json");
    std::fs::copy(&committed, &fresh).unwrap();
    let single = start_single(dir);
    eprintln!("no AVX2 kernels on this CPU: recording one machine's answers afresh");
    exactness_script(&["record", &format!("http://{}", single.1)], &fresh);
    fresh
}

fn exactness_script(args: &[&str], fixture: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("tests/e2e/logprob_exactness.py"))
        .arg(args[0])
        .arg(args[1])
        .arg(fixture)
        .args(&args[2..])
        .output()
        .expect("running python3");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "logprob_exactness.py {args:?} failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    stdout.into_owned()
}

/// Exact by default (no `--activation-dtype`): one machine, 3 stages, a worker killed
/// mid-answer, and the 2 stages left all give the fixture's log-probabilities bit for bit —
/// text equality alone would not do (f16 activations kept 6 of 11 texts while changing their
/// log-probabilities).
#[test]
fn the_default_cluster_gives_one_machines_log_probabilities_bit_for_bit() {
    let dir = temp_dir("exact");
    let fixture = exactness_fixture(&dir);
    let single = start_single(&dir);
    exactness_script(&["check", &format!("http://{}", single.1), "one machine"], &fixture);
    drop(single);

    let coordinator = start_coordinator(&dir, &["--workers", "3", "--no-local-layers", "--planner", "proportional"]);
    let _w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let w2 = start_worker(&dir, "w2", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let _w3 = start_worker(&dir, "w3", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    wait_for_stages(&coordinator, 3, Duration::from_secs(180));
    let url = format!("http://{}", coordinator.http);
    exactness_script(&["check", &url, "3 stages"], &fixture);
    // A worker killed mid-answer: the cluster re-plans, replays the tokens so far, and the
    // answer goes on with the same bits.
    exactness_script(&["check-killed", &url, &w2.child.id().to_string()], &fixture);
    let health = wait_for_stages(&coordinator, 2, Duration::from_secs(60));
    assert!(health["stages"].as_array().unwrap().iter().all(|s| s["name"] != "w2"), "{health}");
    exactness_script(&["check", &url, "2 stages"], &fixture);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prefix caching on a 2-stage cluster: a 10-turn chat (each turn resending the history)
/// answers the same with the kept caches and without, its last turn's prompt comes mostly
/// from the cache, and after a worker is killed with cached prefixes in place the cluster
/// re-plans and the same chat answers the same again (tests/e2e/prefix_cache_chat.py prints
/// the last turn's time to first token with and without the cache).
#[test]
fn a_chat_reuses_its_cached_prefix_and_survives_a_replan() {
    let dir = temp_dir("prefix-cache");
    let coordinator = start_coordinator(&dir, &["--workers", "2", "--no-local-layers", "--planner", "proportional"]);
    let _w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let w2 = start_worker(&dir, "w2", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    wait_for_stages(&coordinator, 2, Duration::from_secs(180));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new("python3")
        .arg(root.join("tests/e2e/prefix_cache_chat.py"))
        .arg(format!("http://{}", coordinator.http))
        .arg(w2.child.id().to_string())
        .status()
        .expect("running python3");
    assert!(status.success(), "prefix_cache_chat.py failed against the cluster");
    let health = wait_for_stages(&coordinator, 1, Duration::from_secs(60));
    assert!(health["stages"][0]["name"] == "w1", "{health}");
    let metrics = get_text(&coordinator.http, "/metrics");
    let cached = metrics.lines().find_map(|l| l.strip_prefix("potluck_prompt_tokens_cached_total ")).expect("the counter");
    assert!(cached.trim().parse::<u64>().unwrap() > 1000, "{cached}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker with its own copy of the model reads its slice from disk: nothing crosses the
/// network and the answers are the fixture's, bit for bit; a restart hashes nothing again.
/// A copy with one byte of its weights changed (the same header: what a fine-tune that kept
/// every key looks like) is caught tensor by tensor, said plainly, and the slice is fetched.
#[test]
fn a_worker_with_the_model_file_reads_its_slice_from_disk() {
    let dir = temp_dir("local-model");
    let fixture = exactness_fixture(&dir);
    let coordinator = start_coordinator(&dir, &["--workers", "1", "--no-local-layers"]);
    let model = model_path();
    let model_arg = model.to_str().unwrap();
    let mut worker = start_worker(&dir, "w1", &coordinator, TOKEN, &["--model", model_arg]);
    wait_for_stages(&coordinator, 1, Duration::from_secs(180));
    worker.wait_for_line("reading it from disk, nothing over the network", Duration::from_secs(10));
    let health = get_json(&coordinator.http, "/health");
    assert_eq!(health["cluster"]["weight_bytes_sent"], 0, "the slice came from the worker's disk: {health}");
    exactness_script(&["check", &format!("http://{}", coordinator.http), "1 worker reading its own file"], &fixture);

    // A restart: the hashes are remembered next to the worker's key, nothing is read to check.
    let _ = worker.child.kill();
    let _ = worker.child.wait();
    let mut worker = start_worker(&dir, "w1", &coordinator, TOKEN, &["--model", model_arg]);
    let line = worker.wait_for_line("reading it from disk", Duration::from_secs(120));
    assert!(line.contains("none read to check it"), "a restart hashes nothing: {line}");
    wait_for_stages(&coordinator, 1, Duration::from_secs(120));
    let _ = worker.child.kill();
    let _ = worker.child.wait();

    // One byte changed in the middle of the weights, the header untouched.
    let altered = dir.join("altered.gguf");
    std::fs::copy(&model, &altered).unwrap();
    let mut bytes = std::fs::read(&altered).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&altered, &bytes).unwrap();
    drop(bytes);
    let other = start_worker(&dir, "w2", &coordinator, TOKEN, &["--model", altered.to_str().unwrap()]);
    let line = other.wait_for_line("--model not used for this slice", Duration::from_secs(180));
    assert!(line.contains("has the coordinator's header but not its weights") && line.contains("SHA-256"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let health = loop {
        let health = wait_for_stages(&coordinator, 1, Duration::from_secs(180));
        if health["stages"][0]["name"] == "w2" {
            break health;
        }
        assert!(Instant::now() < deadline, "w2 never took the slice: {health}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(health["cluster"]["weight_bytes_sent"].as_u64().unwrap() > 50 << 20, "the slice was fetched instead: {health}");
    run_python("cluster_client.py", &coordinator.http);

    // SIGTERM (a service manager stopping the worker) is a clean leave: the worker exits 0
    // and the coordinator sees it gone at once, not after the 3 s of silence a crash takes.
    let mut other = other;
    let status = Command::new("kill").args(["-TERM", &other.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(other.wait_exit(Duration::from_secs(20)).success(), "a worker stopped by SIGTERM exits 0");
    let stopped = Instant::now();
    assert!(other.output_contains("left the cluster"), "the worker says it left");
    loop {
        let health = get_json(&coordinator.http, "/health");
        if health["nodes"].as_array().unwrap().iter().any(|n| n["name"] == "w2" && n["state"].as_str().unwrap().starts_with("gone")) {
            break;
        }
        assert!(stopped.elapsed() < Duration::from_millis(2500), "the coordinator did not see the clean leave at once: {health}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_joining_mid_stream_changes_no_token_and_the_next_request_uses_it() {
    let dir = temp_dir("join");
    let coordinator = start_coordinator(
        &dir,
        &["--workers", "2", "--no-local-layers", "--planner", "proportional", "--activation-dtype", "f32"],
    );
    let _w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let _w2 = start_worker(&dir, "w2", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    wait_for_stages(&coordinator, 2, Duration::from_secs(180));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut client = Process::spawn(
        "client",
        Command::new("python3")
            .arg(root.join("tests/e2e/disturb_midstream.py"))
            .arg(format!("http://{}", coordinator.http))
            .arg("notify")
            .arg("400"),
    );
    client.wait_for_line("disturb now", Duration::from_secs(180));
    let _w3 = start_worker(&dir, "w3", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    // The new plan must take over while the answer is still streaming.
    let ready_lines = |c: &Coordinator| c.process.output.lock().unwrap().iter().filter(|l| l.contains("cluster ready")).count();
    let mut switched_mid_stream = false;
    let status = loop {
        if let Some(status) = client.child.try_wait().unwrap() {
            break status;
        }
        switched_mid_stream |= ready_lines(&coordinator) >= 2;
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the stream must be unchanged by the join");
    assert!(switched_mid_stream, "the three-stage plan did not take over during the stream");
    let health = wait_for_stages(&coordinator, 3, Duration::from_secs(60));
    assert!(health["stages"].as_array().unwrap().iter().any(|s| s["name"] == "w3"), "{health}");
    // The next requests run on the new plan and still answer exactly as one machine.
    run_python("cluster_client.py", &coordinator.http);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two free UDP ports in a row (the cluster port and the data port above it).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let first = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && std::net::UdpSocket::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two free UDP ports in a row");
}

#[test]
fn workers_find_a_restarted_coordinator_on_their_own() {
    let dir = temp_dir("restart-coordinator");
    let listen = format!("127.0.0.1:{}", free_port_pair());
    let args = ["--workers", "1", "--no-local-layers", "--planner", "proportional", "--activation-dtype", "f32"];
    let coordinator = start_coordinator_on(&dir, &listen, &args);
    let w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    wait_for_stages(&coordinator, 1, Duration::from_secs(180));
    drop(coordinator); // SIGKILL: no goodbye to the worker
    w1.wait_for_line("lost the coordinator", Duration::from_secs(30));
    // Same config directory (node key, token) and port: the worker finds it again by itself.
    let coordinator = start_coordinator_on(&dir, &listen, &args);
    let health = wait_for_stages(&coordinator, 1, Duration::from_secs(120));
    assert_eq!(health["stages"][0]["name"], "w1", "{health}");
    assert_eq!(health["cluster"]["weight_bytes_sent"], 0, "the rejoined worker loads from its cache: {health}");
    run_python("cluster_client.py", &coordinator.http);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A live worker gets plaintext garbage, a connection from a node that is not its upstream,
/// and every kind of malformed frame from the one node it does accept data from (the
/// coordinator; the test reads its key): each bad connection is closed with a reason, and
/// the worker stays up and keeps answering exactly as before.
#[test]
fn hostile_peers_cannot_disturb_a_live_worker() {
    use potluck_protocol::{encode, encode_unchecked, Activations, Dtype, FrameHeader, Kind, Message, Segment, PROTOCOL_VERSION};
    use potluck_node::net::identity::NodeIdentity;
    use potluck_node::net::tls::{self, Plane};

    let dir = temp_dir("hostile");
    let coordinator = start_coordinator(
        &dir,
        &["--workers", "1", "--no-local-layers", "--planner", "proportional", "--activation-dtype", "f32"],
    );
    let mut w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let health = wait_for_stages(&coordinator, 1, Duration::from_secs(180));
    let data: std::net::SocketAddr = health["nodes"][0]["data_address"].as_str().unwrap().parse().unwrap();
    let coordinator_key = NodeIdentity::load_or_create(&dir.join("coordinator-config/coordinator.key")).unwrap();
    let stranger = NodeIdentity::generate();
    let activations = |payload: usize| {
        Message::Activations(Activations {
            step: 1,
            segments: vec![Segment { sequence_id: 1, first_position: 0, n_rows: 1, sample: false, allowed: None, draft: Vec::new() }],
            dtype: Dtype::F32,
            hidden: 576,
            payload: vec![0; payload],
        })
    };
    let with_byte = |at: usize, value: u8| {
        let mut frame = encode(&Message::Ready).unwrap();
        frame[at] = value;
        frame
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0x5a; 64]),
        ("bad magic", with_byte(0, b'H')),
        ("wrong version", with_byte(4, 99)),
        ("unknown kind", with_byte(6, 200)),
        ("unknown flags", with_byte(7, 1)),
        (
            "over its limit",
            FrameHeader { version: PROTOCOL_VERSION, kind: Kind::Activations as u8, flags: 0, body_len: u32::MAX }.to_bytes().to_vec(),
        ),
        ("truncated", {
            let frame = encode(&activations(576 * 4)).unwrap();
            frame[..frame.len() - 10].to_vec()
        }),
        ("shape × dtype ≠ payload", encode_unchecked(&activations(10)).unwrap()),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let closed_within = |connection: quinn::Connection, what: &'static str| async move {
            match tokio::time::timeout(Duration::from_secs(10), connection.closed()).await {
                Ok(reason) => reason.to_string(),
                Err(_) => panic!("{what}: the worker did not close the connection"),
            }
        };
        // Plaintext datagrams: no state, no answer that matters.
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for len in [1, 100, 1200] {
            udp.send_to(&vec![0xab; len], data).await.unwrap();
        }
        // A node with a key but no place in the pipeline: closed after the handshake.
        let endpoint = tls::endpoint_for(Plane::Data, &stranger, "127.0.0.1:0".parse().unwrap()).unwrap();
        let connection = tls::connect_on(Plane::Data, &endpoint, &stranger, data, None).await.unwrap();
        let reason = closed_within(connection, "a stranger").await;
        assert!(reason.contains("not a member"), "a stranger: {reason}");
        // Malformed frames from the accepted identity: each closes its connection.
        let trusted = tls::endpoint_for(Plane::Data, &coordinator_key, "127.0.0.1:0".parse().unwrap()).unwrap();
        for (what, bytes) in cases {
            let connection = tls::connect_on(Plane::Data, &trusted, &coordinator_key, data, None).await.unwrap();
            let mut send = connection.open_uni().await.unwrap();
            send.write_all(&bytes).await.unwrap();
            send.finish().unwrap();
            let reason = closed_within(connection, what).await;
            assert!(reason.contains("protocol error"), "{what}: {reason}");
        }
    });
    assert!(w1.child.try_wait().unwrap().is_none(), "the worker died");
    // Still serving, still exact.
    run_python("cluster_client.py", &coordinator.http);
    assert!(w1.output_contains("bad data stream; closing the connection"), "the worker logs why it closed them");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends a JSON POST of `body` to `path`; the response is for the caller to read.
fn send_post(address: &str, path: &str, body: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

/// POST `body` to `path`; the status code and the whole response text.
fn post(address: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = send_post(address, path, body);
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response)
}

/// Two workers hold the model between them; one dies mid-answer and the one left cannot
/// hold it alone: the streamed answer ends with an error that says so, and new requests get
/// a 503 with the reason, instead of waiting for a plan that cannot come.
#[test]
fn when_the_model_no_longer_fits_requests_fail_clearly() {
    let dir = temp_dir("no-fit");
    let coordinator = start_coordinator(
        &dir,
        &["--workers", "2", "--no-local-layers", "--ctx-size", "256", "--activation-dtype", "f32"],
    );
    // 182 MiB with the KV cache of 16 sequences × 256 tokens: neither worker can hold it alone.
    let _w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "100MiB"]);
    let mut w2 = start_worker(&dir, "w2", &coordinator, TOKEN, &["--memory-limit", "120MiB"]);
    wait_for_stages(&coordinator, 2, Duration::from_secs(180));
    let body = r#"{"model":"x","prompt":"The capital of France is","max_tokens":200,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let mut reader = BufReader::new(send_post(&coordinator.http, "/v1/completions", body));
    let mut seen = 0;
    let mut line = String::new();
    while seen < 10 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended early");
        seen += usize::from(line.starts_with("data: {"));
    }
    w2.child.kill().unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("does not fit"), "the stream must end with the reason: {rest}");
    let (status, response) = post(&coordinator.http, "/v1/completions", r#"{"model":"x","prompt":"Hi","max_tokens":4}"#);
    assert_eq!(status, 503, "{response}");
    assert!(response.contains("does not fit") && response.contains("model_unavailable"), "{response}");
    assert!(response.to_ascii_lowercase().contains("retry-after"), "{response}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 6's load test: 64 streaming clients (chat and completions) for two minutes against
/// two stages (the coordinator holds stage 0, one worker the rest). Every request succeeds,
/// every stream ends with `[DONE]`, and neither process's memory grows after the warm-up.
/// The split is `--planner throughput`'s (what a cluster serving many would use).
/// `POTLUCK_LOAD_SECONDS` shortens it for a quick local run.
#[test]
fn sixty_four_streaming_clients_for_two_minutes() {
    let dir = temp_dir("load");
    let coordinator =
        start_coordinator(&dir, &["--workers", "1", "--planner", "throughput", "--memory-limit", "4GiB", "--activation-dtype", "f32"]);
    let worker = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    wait_for_plan(&coordinator, 2, true, Duration::from_secs(180));
    let seconds = std::env::var("POTLUCK_LOAD_SECONDS").unwrap_or_else(|_| "120".into());
    // Allocator arenas and caches reach their high-water mark within about a minute of this
    // load (repeated runs stay flat after it): the second half must not grow.
    let warmup = (seconds.parse::<f64>().unwrap_or(120.0) / 2.0).to_string();
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/load_test.py"))
        .arg(format!("http://{}", coordinator.http))
        .args(["--clients", "64", "--seconds", &seconds, "--warmup", &warmup])
        .args(["--pid", &format!("coordinator={}", coordinator.process.child.id())])
        .args(["--pid", &format!("worker={}", worker.child.id())])
        .status()
        .expect("running python3");
    assert!(status.success(), "the load test failed");
    // The cluster is still whole and answers exactly.
    run_python("cluster_client.py", &coordinator.http);
    let _ = std::fs::remove_dir_all(&dir);
}


/// A memory figure of a process from /proc/PID/status (`VmRSS`, `VmHWM`), in bytes.
fn resident_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Plan before loading: a coordinator whose memory budget cannot hold the model never loads
/// it. It serves the API and the dashboard at once, answers `/v1/*` with 503
/// `model_unavailable` saying how much is missing and how to add a machine, and answers as
/// one machine does (f32 activations, the default) once a worker has joined.
#[test]
fn a_model_too_big_for_the_coordinator_waits_for_workers_without_loading() {
    let dir = temp_dir("too-big");
    let (single, single_http) = start_single(&dir);
    let prompt = r#"{"model":"x","prompt":"The capital of France is","max_tokens":12,"temperature":0}"#;
    let (status, expected) = post(&single_http, "/v1/completions", prompt);
    assert_eq!(status, 200, "{expected}");
    drop(single);

    // 182 MiB with the KV cache of 16 sequences × 256 tokens (see the test above) > 64 MiB.
    let coordinator = start_coordinator(&dir, &["--memory-limit", "64MiB", "--ctx-size", "256"]);
    assert!(!get_json(&coordinator.http, "/health")["model"].is_null(), "/health serves at once");
    let (status, response) = post(&coordinator.http, "/v1/completions", prompt);
    assert_eq!(status, 503, "{response}");
    for needle in ["model_unavailable", "missing", "worker join"] {
        assert!(response.contains(needle), "the refusal should say {needle:?}: {response}");
    }
    // Its logs go to a pipe here, as into a file or journald: no colour escape codes.
    coordinator.process.wait_for_line("missing", Duration::from_secs(10));
    assert!(
        !coordinator.process.output.lock().unwrap().iter().any(|l| l.contains('\u{1b}')),
        "log lines carry ANSI escape codes into a pipe"
    );
    let model_bytes = std::fs::metadata(model_path()).unwrap().len();
    // Resident now, not the peak: measuring the device at start streams through a buffer of
    // up to 256 MiB (`device::STREAM_BYTES_MAX`), freed before the model is considered.
    let pid = coordinator.process.child.id();
    let resident = resident_bytes(pid, "VmRSS:");
    println!(
        "coordinator before any worker: {} MiB resident, {} MiB peak (model file {} MiB)",
        resident >> 20,
        resident_bytes(pid, "VmHWM:") >> 20,
        model_bytes >> 20
    );
    assert!(resident < model_bytes / 2, "the coordinator holds the model anyway: {resident} bytes resident, model {model_bytes}");

    let _worker = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let deadline = Instant::now() + Duration::from_secs(180);
    let answer = loop {
        let (status, response) = post(&coordinator.http, "/v1/completions", prompt);
        if status == 200 {
            break response;
        }
        assert!(Instant::now() < deadline, "no answer after a worker joined: {status} {response}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let text = |response: &str| {
        let body = response.split_once("\r\n\r\n").map_or(response, |(_, body)| body);
        serde_json::from_str::<serde_json::Value>(body).unwrap()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(text(&answer), text(&expected), "the cluster must answer as one machine does");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM (what systemd sends) drains: the answer streaming when it arrives runs to its end
/// with `[DONE]`, and the server then exits 0.
#[test]
fn sigterm_lets_an_open_stream_finish_then_exits_cleanly() {
    let dir = temp_dir("sigterm");
    let (mut single, http) = start_single(&dir);
    let body = r#"{"model":"x","prompt":"The capital of France is","max_tokens":48,"temperature":0,"ignore_eos":true,"stream":true}"#;
    let mut reader = BufReader::new(send_post(&http, "/v1/completions", body));
    let mut line = String::new();
    let mut chunks = 0;
    while chunks < 3 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended early");
        chunks += usize::from(line.starts_with("data: {"));
    }
    let status = Command::new("kill").args(["-TERM", &single.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let streamed = rest.matches("data: {").count() + chunks;
    assert!(rest.contains("\"finish_reason\":\"length\""), "the answer must run to its end: {rest}");
    assert!(rest.contains("data: [DONE]"), "the stream must end with [DONE]: {rest}");
    assert!(streamed >= 48, "only {streamed} chunks arrived");
    let exit = single.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "the server should exit 0 after draining: {exit:?}");
    assert!(single.output_contains("draining"), "it should say it is draining");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Gemma 3 270M (`coordinator fetch-model gemma3-270m`; `$POTLUCK_GEMMA3_MODEL` overrides).
fn gemma3_path() -> PathBuf {
    let path = std::env::var_os("POTLUCK_GEMMA3_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/potluck/models/gemma-3-270m-q4_k_m.gguf")
    });
    assert!(path.exists(), "Gemma 3 missing at {}: run `coordinator fetch-model gemma3-270m` or set POTLUCK_GEMMA3_MODEL", path.display());
    path
}

/// Each completion request's text, checking it ran to `completion_tokens` tokens.
fn completion_texts(http: &str, requests: &[&str], completion_tokens: u64) -> Vec<String> {
    requests
        .iter()
        .map(|body| {
            let (status, response) = post(http, "/v1/completions", body);
            assert_eq!(status, 200, "{response}");
            let json: serde_json::Value = serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
            assert_eq!(json["usage"]["completion_tokens"], completion_tokens, "{json}");
            json["choices"][0]["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// A second real architecture through the whole product: Gemma 3 270M split over two
/// processes (the coordinator's stage and a worker's, local and global attention layers on
/// both) answers greedy and seeded completions, streamed and not, exactly as one machine
/// does; its GGUF has no chat template, so the chat endpoint says so (400) and completions
/// still serve.
#[test]
fn gemma_3_on_two_stages_answers_as_one_machine() {
    let dir = temp_dir("gemma3");
    let model = gemma3_path();
    let requests = [
        r#"{"model":"x","prompt":"The capital of France is","max_tokens":24,"temperature":0}"#,
        r#"{"model":"x","prompt":"def fibonacci(n):\n","max_tokens":24,"temperature":0}"#,
        r#"{"model":"x","prompt":"Once upon a time","max_tokens":24,"temperature":0.8,"seed":7}"#,
    ];
    let texts = |http: &str| completion_texts(http, &requests, 24);
    let (single, single_http) = start_single_with(&dir, &model);
    let alone = texts(&single_http);
    let (status, chat) = post(&single_http, "/v1/chat/completions", r#"{"model":"x","messages":[{"role":"user","content":"Hi"}]}"#);
    assert_eq!(status, 400, "{chat}");
    assert!(chat.contains("no_chat_template") && chat.contains("/v1/completions"), "{chat}");
    drop(single);

    let coordinator = start_coordinator_with(&dir, &model, "127.0.0.1:0", &["--workers", "1", "--planner", "throughput"]);
    let _worker = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let health = wait_for_plan(&coordinator, 2, true, Duration::from_secs(180));
    let split: Vec<String> = health["stages"].as_array().unwrap().iter().map(|s| s["layers"].to_string()).collect();
    println!("gemma 3 stages: {split:?}; alone: {alone:?}");
    assert_eq!(texts(&coordinator.http), alone, "two stages must answer as one machine");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A mixture of experts through the whole product: a seeded random-weight model with
/// Mixtral's layout (a `llama` GGUF whose every block routes each token to 2 of 8 experts;
/// the default model's tokenizer) split over two worker processes answers greedy and seeded
/// completions exactly as one machine does.
#[test]
fn a_mixture_of_experts_on_two_stages_answers_as_one_machine() {
    use potluck_engine::random_gguf::{self, ModelShape, RandomGguf, TokenizerMetadata};
    let dir = temp_dir("moe");
    let model = dir.join("mixtral-layout.gguf");
    let donor = random_gguf::default_donor_path().expect("the default model (the tokenizer donor) is missing");
    RandomGguf::new(ModelShape::tiny_moe(), potluck_engine::quant::GgmlDType::Q8_0, 41)
        .with_tokenizer(TokenizerMetadata::from_gguf(&donor).unwrap())
        .write(&model)
        .unwrap();
    let requests = [
        r#"{"model":"x","prompt":"The capital of France is","max_tokens":16,"temperature":0}"#,
        r#"{"model":"x","prompt":"Once upon a time","max_tokens":16,"temperature":0.8,"seed":7}"#,
    ];
    let texts = |http: &str| completion_texts(http, &requests, 16);
    let (single, single_http) = start_single_with(&dir, &model);
    let alone = texts(&single_http);
    drop(single);

    // Two workers of equal memory, split by memory: two stages of 2 layers whatever the
    // machine's load (the cost-model planners keep a 33 MB model on one machine when a busy
    // CI run makes a worker measure slow).
    let coordinator =
        start_coordinator_with(&dir, &model, "127.0.0.1:0", &["--workers", "2", "--no-local-layers", "--planner", "proportional"]);
    let _w1 = start_worker(&dir, "w1", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let _w2 = start_worker(&dir, "w2", &coordinator, TOKEN, &["--memory-limit", "4GiB"]);
    let health = wait_for_plan(&coordinator, 2, false, Duration::from_secs(180));
    let split: Vec<String> = health["stages"].as_array().unwrap().iter().map(|s| s["layers"].to_string()).collect();
    println!("mixture of experts stages: {split:?}; alone: {alone:?}");
    assert_eq!(split, ["[0,2]", "[2,4]"], "each stage holds 2 blocks of experts");
    assert_eq!(texts(&coordinator.http), alone, "two stages must answer as one machine");
    let _ = std::fs::remove_dir_all(&dir);
}

//! LAN discovery between real network stacks: `examples/netns_cluster.sh up` builds three
//! hosts (network namespaces on one bridge), a node announces itself on one and
//! `discover` runs on another. libp2p's mDNS ignores loopback, so this is the only way to
//! test discovery on one machine.
//!
//! Needs root and iproute2 (CI runs as root). Elsewhere the tests fail with a message
//! saying so, unless `POTLUCK_SKIP_NETNS=1` is set.
//!
//! The processes on the hosts are this test binary itself, started again inside a
//! namespace with [`PROBE_ENV`] set, so that its `probe_process` entry point plays the
//! advertiser or the discoverer (the same calls `worker/examples/discovery_probe.rs`
//! makes). Cargo builds examples only for some `cargo test` invocations, and a nested
//! `cargo build` would wait on the lock the running `cargo test` holds, so re-running
//! ourselves is the one way that needs no build step.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use potluck_node::net::discovery::{
    advertise, discover, DISCOVERY_GRACE_MS, DISCOVERY_TIMEOUT_MS,
};
use potluck_node::net::identity::NodeIdentity;

/// Set on the re-run test binary: `advertise PORT` or `discover TIMEOUT_MS`.
const PROBE_ENV: &str = "POTLUCK_DISCOVERY_PROBE";

/// How long we wait for a probe process to say it is announcing (or has stopped).
const PROBE_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The port the advertisers announce (each host is a network stack of its own, so every
/// test can use the same one).
const CLUSTER_PORT: u16 = 7070;

// ---------------------------------------------------------------------------------------
// The tests

#[test]
fn a_worker_host_discovers_the_coordinator_host() {
    let Some(hosts) = Hosts::up("find") else {
        return;
    };
    let advertiser = hosts.start_advertiser("coord", CLUSTER_PORT);
    for worker in ["w1", "w2"] {
        let found = hosts.discover(worker, DISCOVERY_TIMEOUT_MS);
        println!(
            "discovery from {worker}: {} node(s); discover() returned after {} ms \
             (first answer after about {} ms, then the {DISCOVERY_GRACE_MS} ms grace)",
            found.nodes.len(),
            found.elapsed_ms,
            found.elapsed_ms.saturating_sub(DISCOVERY_GRACE_MS)
        );
        assert_eq!(
            found.nodes,
            vec![(
                advertiser.node_id.clone(),
                vec![hosts.address("coord", CLUSTER_PORT)]
            )],
            "from {worker}"
        );
        assert!(
            found.elapsed_ms < DISCOVERY_TIMEOUT_MS,
            "discovery from {worker} took {} ms: it should return {DISCOVERY_GRACE_MS} ms after \
             the first answer, not run to its {DISCOVERY_TIMEOUT_MS} ms timeout",
            found.elapsed_ms
        );
    }
}

#[test]
fn every_advertiser_is_found_and_only_while_it_advertises() {
    let Some(hosts) = Hosts::up("many") else {
        return;
    };
    let mut coordinator = hosts.start_advertiser("coord", CLUSTER_PORT);
    let other = hosts.start_advertiser("w2", CLUSTER_PORT + 1);

    let found = hosts.discover("w1", DISCOVERY_TIMEOUT_MS);
    println!(
        "two advertisers: found {} in {} ms",
        found.nodes.len(),
        found.elapsed_ms
    );
    let mut expected = vec![
        (
            coordinator.node_id.clone(),
            vec![hosts.address("coord", CLUSTER_PORT)],
        ),
        (
            other.node_id.clone(),
            vec![hosts.address("w2", CLUSTER_PORT + 1)],
        ),
    ];
    let mut nodes = found.nodes;
    nodes.sort();
    expected.sort();
    assert_eq!(nodes, expected);

    // Dropping the Advertiser must silence it (libp2p-mdns leaves its tasks running when
    // its behaviour is dropped; discovery.rs owns a runtime to stop them).
    coordinator.stop();
    let found = hosts.discover("w1", DISCOVERY_TIMEOUT_MS);
    assert_eq!(
        found.nodes,
        vec![(
            other.node_id.clone(),
            vec![hosts.address("w2", CLUSTER_PORT + 1)]
        )],
        "the stopped advertiser must no longer be found"
    );
}

#[test]
fn nothing_is_found_when_nobody_advertises() {
    let Some(hosts) = Hosts::up("none") else {
        return;
    };
    let timeout_ms = 1_000;
    let found = hosts.discover("w1", timeout_ms);
    assert!(found.nodes.is_empty(), "{:?}", found.nodes);
    assert!(
        found.elapsed_ms >= timeout_ms,
        "returned after {} ms, before its {timeout_ms} ms timeout",
        found.elapsed_ms
    );
}

/// Not a test: the entry point of the probe processes (see the file's doc). Without
/// [`PROBE_ENV`] it does nothing.
#[test]
fn probe_process() {
    let Ok(command) = std::env::var(PROBE_ENV) else {
        return;
    };
    match command.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["advertise", port] => {
            let identity = NodeIdentity::generate();
            let advertiser = advertise(&identity, port.parse().unwrap()).unwrap();
            println!("ADVERTISING {}", identity.node_id());
            // Announce until told to stop on stdin (or killed), then stay alive silent, so
            // only the drop of the Advertiser can explain the silence.
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).unwrap() > 0 && line.trim() != "stop" {
                line.clear();
            }
            drop(advertiser);
            println!("STOPPED");
            loop {
                std::thread::park();
            }
        }
        ["discover", timeout_ms] => {
            let timeout = Duration::from_millis(timeout_ms.parse().unwrap());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let started = Instant::now();
            let nodes = runtime.block_on(discover(timeout)).unwrap();
            println!("ELAPSED_MS {}", started.elapsed().as_millis());
            for node in nodes {
                let addresses: Vec<String> =
                    node.addresses.iter().map(ToString::to_string).collect();
                println!("FOUND {} {}", node.node_id, addresses.join(" "));
            }
        }
        _ => panic!("bad {PROBE_ENV}: {command}"),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// The test hosts of one test, removed (with everything running on them) when dropped,
/// also when the test fails.
struct Hosts {
    prefix: String,
    subnet: String,
}

impl Hosts {
    /// Builds the hosts under a prefix and subnet of this test's own, or returns `None`
    /// (after saying so) when `POTLUCK_SKIP_NETNS=1`.
    fn up(name: &str) -> Option<Self> {
        if std::env::var("POTLUCK_SKIP_NETNS").as_deref() == Ok("1") {
            eprintln!(
                "skipped: POTLUCK_SKIP_NETNS=1 (this test needs root and network namespaces)"
            );
            return None;
        }
        assert!(
            running_as_root(),
            "this test builds network namespaces (libp2p's mDNS ignores loopback), so it needs \
             root: run it as root, or set POTLUCK_SKIP_NETNS=1 to skip it"
        );
        assert!(
            Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()),
            "this test needs the `ip` command (package iproute2), or POTLUCK_SKIP_NETNS=1 to skip it"
        );
        // Unique per process and per test, so parallel tests and parallel runs never share
        // a namespace name.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let index = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let hosts = Self {
            prefix: format!("plkt{pid}-{name}{index}"),
            subnet: format!("10.{}.{}", 100 + pid % 100, index % 256),
        };
        let started = Instant::now();
        hosts.script("up");
        println!(
            "hosts {}-{{coord,w1,w2}} on {}.0/24 up in {} ms",
            hosts.prefix,
            hosts.subnet,
            started.elapsed().as_millis()
        );
        Some(hosts)
    }

    fn script(&self, command: &str) {
        let script = script();
        let output = Command::new("bash")
            .arg(&script)
            .arg(command)
            .env("PLK_PREFIX", &self.prefix)
            .env("PLK_SUBNET", &self.subnet)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "`netns_cluster.sh {command}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn namespace(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// `host`'s address (coord .1, w1 .2, w2 .3, as the script assigns them) and `port`.
    fn address(&self, host: &str, port: u16) -> SocketAddr {
        let last = match host {
            "coord" => 1,
            "w1" => 2,
            "w2" => 3,
            _ => panic!("unknown host {host}"),
        };
        format!("{}.{last}:{port}", self.subnet).parse().unwrap()
    }

    /// This test binary, inside `host`'s namespace, as a probe process.
    fn probe(&self, host: &str, probe: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(host)])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "probe_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE_ENV, probe);
        command
    }

    fn start_advertiser(&self, host: &str, port: u16) -> Advertising {
        let mut child = self
            .probe(host, &format!("advertise {port}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start the advertiser probe");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut advertising = Advertising {
            child,
            stdin,
            lines,
            node_id: String::new(),
        };
        advertising.node_id = advertising.wait_for_line("ADVERTISING ").trim().to_string();
        advertising
    }

    fn discover(&self, host: &str, timeout_ms: u64) -> Found {
        let output = self
            .probe(host, &format!("discover {timeout_ms}"))
            .output()
            .expect("cannot start the discovery probe");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the discovery probe on {host} failed ({}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let mut found = Found {
            nodes: Vec::new(),
            elapsed_ms: u64::MAX,
        };
        for line in stdout.lines() {
            if let Some(elapsed) = after(line, "ELAPSED_MS ") {
                found.elapsed_ms = elapsed.trim().parse().unwrap();
            } else if let Some(node) = after(line, "FOUND ") {
                let mut words = node.split_whitespace();
                let node_id = words.next().unwrap().to_string();
                let addresses = words.map(|word| word.parse().unwrap()).collect();
                found.nodes.push((node_id, addresses));
            }
        }
        assert_ne!(
            found.elapsed_ms,
            u64::MAX,
            "no ELAPSED_MS line in:\n{stdout}"
        );
        found
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // `down` also ends the probe processes still running on the hosts. A panic here
        // during a failing test would abort, so failures are only reported.
        let script = script();
        match Command::new("bash")
            .arg(&script)
            .arg("down")
            .env("PLK_PREFIX", &self.prefix)
            .env("PLK_SUBNET", &self.subnet)
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "warning: `netns_cluster.sh down` for {} failed: {}",
                self.prefix,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(e) => eprintln!("warning: cannot run {}: {e}", script.display()),
        }
    }
}

/// An advertiser probe process; killed when dropped.
struct Advertising {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    node_id: String,
}

impl Advertising {
    /// What follows `marker` on the first line that has it.
    fn wait_for_line(&mut self, marker: &str) -> String {
        let deadline = Instant::now() + PROBE_READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = after(&line, marker) {
                        return rest.to_string();
                    }
                }
                Err(_) => panic!(
                    "the advertiser probe printed no `{marker}` line within {PROBE_READY_TIMEOUT:?} \
                     (exit status: {:?})",
                    self.child.try_wait()
                ),
            }
        }
    }

    /// Drops the probe's `Advertiser` (the process stays alive).
    fn stop(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"stop\n").unwrap();
        stdin.flush().unwrap();
        self.wait_for_line("STOPPED");
    }
}

impl Drop for Advertising {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Found {
    /// (node id, addresses) in the order discovery returned them.
    nodes: Vec<(String, Vec<SocketAddr>)>,
    /// Time inside the probe from calling `discover` to its return.
    elapsed_ms: u64,
}

fn running_as_root() -> bool {
    // The effective uid, from the kernel: the second number on the `Uid:` line.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// What follows `marker` in `line`. The probe's lines can follow libtest's
/// `test probe_process ... ` on the same line, so markers are searched, not prefixes.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|start| &line[start + marker.len()..])
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/netns_cluster.sh")
}

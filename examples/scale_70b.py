#!/usr/bin/env python3
"""The cluster at a 70B model's layer shapes, every node under an OS-enforced memory limit.

    sudo python3 examples/scale_70b.py [--layers 4] [--limit-mib 1500] [--overhead-mib 320]

What it does (the figures go to stdout as a table and to --json):
1. Writes (once) a random-weight GGUF with Llama-3-70B's layer shapes (hidden 8192, FFN
   28672, 64 heads, 8 KV heads), --layers layers, Q4_0, SmolLM2's tokenizer
   (engine/examples/random_gguf.rs). 4 layers are 2.38 GB.
2. One machine, no limit: `coordinator serve --no-cluster` records the greedy answers of a few
   prompts with their log-probabilities (tests/e2e/logprob_exactness.py record), and its
   decode speed.
3. The cluster on loopback: the coordinator and two workers, each in its own cgroup (v1
   memory controller) whose limit is its --memory-limit plus --overhead-mib, each limit
   below the model's size: a node over its budget is killed by the kernel, not excused.
   The coordinator's peak resident memory (VmHWM) is read before any worker joins and at
   the end; the cluster must give the one-machine answers bit for bit (log-probabilities
   included), and every node's VmHWM must stay within its --memory-limit plus the overhead.
4. Decode tokens/s on the 3 stages, measured against the plan's prediction; each stage's
   measured and predicted time per token; the time from `worker join` to ready over the
   network (an empty cache) and from the worker's own copy of the file (`--model`).
5. A coordinator restart on the same file and config directory: the time from the workers'
   Hello to the first assignment sent, before (tensors hashed) and after (hashes from the
   store).
6. A worker caged below what it was told it may use: the kernel kills it while it loads,
   the coordinator handles it as a node loss, and /v1 answers 503 with what is missing.

Needs root (cgroups), python3, and the release binaries (built here unless --bin-dir has
them). Loopback only; nothing leaves the machine. Exits 1 when a check fails.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CGROUP_ROOT = "/sys/fs/cgroup/memory"
TOKEN = "scale-test-token-0123456789abcdef"
MIB = 1 << 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--limit-mib", type=int, default=1500,
                   help="every node's --memory-limit. 4 layers on 3 nodes: one node holds 2 layers with their "
                        "KV cache at 16 sequences × 4096 (1430 MiB); the ends hold 1 layer and the embedding or head")
    p.add_argument("--overhead-mib", type=int, default=320,
                   help="what a node may hold beyond --memory-limit (docs/operations.md); the cgroup limit is the sum")
    p.add_argument("--work-dir", default="/tmp/potluck-scale")
    p.add_argument("--model", help="the GGUF (default: written into --work-dir)")
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "target/release"))
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--decode-tokens", type=int, default=24)
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args()


class Node:
    """A process whose output lines are kept with the time they arrived."""

    def __init__(self, name, argv, cgroup=None, env=None):
        self.name, self.lines, self.started = name, [], time.monotonic()
        log = open(os.path.join(ARGS.work_dir, f"{name}.log"), "w")

        def enter_cgroup():
            if cgroup:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))

        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=enter_cgroup, env=dict(os.environ, **(env or {})))

        def pump():
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                log.write(line)
                log.flush()

        threading.Thread(target=pump, daemon=True).start()

    def wait_line(self, pattern, timeout_s, after=0.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for stamp, line in list(self.lines):
                if stamp >= after and re.search(pattern, line):
                    return stamp, line
            if self.proc.poll() is not None:
                raise SystemExit(f"FAILED: {self.name} exited ({self.proc.returncode}) before {pattern!r}; see {self.name}.log")
            time.sleep(0.05)
        raise SystemExit(f"FAILED: {self.name}: no line matching {pattern!r} within {timeout_s} s")

    def status_kib(self, field):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def cgroup(name, limit_bytes):
    path = os.path.join(CGROUP_ROOT, f"potluck-scale-{name}")
    if os.path.isdir(path):
        os.rmdir(path)
    os.mkdir(path)
    with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
        f.write(str(limit_bytes))
    memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
    if os.path.exists(memsw):  # no escape into swap either
        with open(memsw, "w") as f:
            f.write(str(limit_bytes))
    return path


def cgroup_figures(path):
    read = lambda f: open(os.path.join(path, f)).read()
    oom = dict(line.split() for line in read("memory.oom_control").splitlines())
    return {"max_usage_bytes": int(read("memory.max_usage_in_bytes")), "oom_kills": int(oom.get("oom_kill", 0))}


def http(url, body=None, timeout=600):
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def http_address(node):
    _, line = node.wait_line(r" on http://", 600)
    return "http://" + line.split(" on http://")[1].split()[0]


def cluster_address(node):
    _, line = node.wait_line(r"cluster endpoint on ", 600)
    return line.split("cluster endpoint on ")[1].split()[0]


def wait_ready(url, stages, timeout_s, workers=True):
    """/health once the pipeline has `stages` stages and every live worker is ready (with
    `workers`, at least one must be live)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, h = http(url + "/health", timeout=10)
            live = [n for n in h.get("nodes", []) if not n["state"].startswith("gone")]
            if len(h.get("stages", [])) == stages and (live or not workers) and all(n["state"] == "ready" for n in live):
                return h
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"FAILED: the cluster did not reach {stages} ready stages within {timeout_s} s")


def wait_gone(url, name, timeout_s):
    """Until /health lists the worker `name` as gone (its loss detected and handled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, h = http(url + "/health", timeout=10)
        if any(n["name"] == name and n["state"].startswith("gone") for n in h.get("nodes", [])):
            return h
        time.sleep(0.5)
    raise SystemExit(f"FAILED: {name} was not seen gone within {timeout_s} s")


def decode_rate(url, tokens):
    """Generated tokens/s of one greedy streamed completion, first token excluded (prefill)."""
    body = {"model": "x", "prompt": "The history of the city begins", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    stamps = []
    with urllib.request.urlopen(request, timeout=1200) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                stamps.append(time.monotonic())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def join_to_assignment(coord):
    """Seconds from the second worker's Hello (the plan waits for two) to the first
    assignment sent: planning plus hashing the slices' tensors, the part a restart should
    not repeat. (From the coordinator's start it would also count the workers' own start.)"""
    coord.wait_line(r"assignment sent", 600)
    joined = [stamp for stamp, line in coord.lines if "worker joined" in line]
    sent = [stamp for stamp, line in coord.lines if "assignment sent" in line]
    return sent[0] - joined[1]


def exactness(mode, url, fixture, label=None):
    argv = [sys.executable, os.path.join(ROOT, "tests/e2e/logprob_exactness.py"), mode, url, fixture]
    out = subprocess.run(argv + ([label] if label else []), capture_output=True, text=True)
    print(out.stdout.strip())
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"FAILED: logprob_exactness.py {mode} ({label})")


def main():
    os.makedirs(ARGS.work_dir, exist_ok=True)
    if os.geteuid() != 0 or not os.path.isdir(CGROUP_ROOT):
        raise SystemExit(f"needs root and the cgroup v1 memory controller at {CGROUP_ROOT}")
    if not ARGS.no_build:
        # Two commands: with `--example`, cargo would build only the example of every package.
        subprocess.run(["cargo", "build", "--release", "-p", "potluck-coordinator", "-p", "potluck-worker"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--release", "-p", "potluck-engine", "--example", "random_gguf"], cwd=ROOT, check=True)
    coordinator_bin = os.path.join(ARGS.bin_dir, "coordinator")
    worker_bin = os.path.join(ARGS.bin_dir, "worker")
    model = ARGS.model or os.path.join(ARGS.work_dir, f"llama3-70b-shape-{ARGS.layers}L-q4_0.gguf")
    if not os.path.exists(model):
        subprocess.run([os.path.join(ARGS.bin_dir, "examples/random_gguf"), "--out", model, "--preset", "llama3-70b",
                        "--layers", str(ARGS.layers), "--dtype", "q4_0"], check=True)
    model_bytes = os.path.getsize(model)
    limit = ARGS.limit_mib * MIB
    overhead = ARGS.overhead_mib * MIB
    if limit + overhead >= model_bytes:
        raise SystemExit(f"a node's limit ({(limit + overhead) / MIB:.0f} MiB) must be below the model's size "
                         f"({model_bytes / MIB:.0f} MiB): lower --limit-mib or write more --layers")
    figures = {"model_bytes": model_bytes, "layers": ARGS.layers, "memory_limit_bytes": limit,
               "overhead_bytes": overhead}
    print(f"model {model}: {model_bytes / MIB:.0f} MiB, {ARGS.layers} layers of Llama-3-70B's shapes")

    # 2. One machine, no limit: the reference answers and decode speed.
    fixture = os.path.join(ARGS.work_dir, "scale-fixture.json")
    cases = [{"name": f"raw{i}", "endpoint": "completions",
              "request": {"prompt": p, "max_tokens": 6, "logprobs": 3, "ignore_eos": True}}
             for i, p in enumerate(["The capital of France is", "Once upon a time", "def main():\n"])]
    cases.append({"name": "chat", "endpoint": "chat", "request": {
        "messages": [{"role": "user", "content": "Hi! How are you?"}], "max_tokens": 6, "logprobs": True,
        "top_logprobs": 3, "ignore_eos": True}})
    with open(fixture, "w") as f:
        json.dump({"cases": cases}, f)
    single = Node("single", [coordinator_bin, "serve", "--no-cluster", "--listen", "127.0.0.1:0", "--threads", "2",
                             "--model", model], env={"POTLUCK_CONFIG_DIR": os.path.join(ARGS.work_dir, "single-config")})
    url = http_address(single)
    wait_ready(url, 1, 600, workers=False)
    exactness("record", url, fixture)
    figures["single_decode_tokens_per_s"] = decode_rate(url, ARGS.decode_tokens)
    figures["single_vmhwm_bytes"] = single.status_kib("VmHWM") * 1024
    single.stop()

    # 3. The cluster, every node in its cgroup.
    groups = {name: cgroup(name, limit + overhead) for name in ("coord", "w1", "w2")}
    config_dir = os.path.join(ARGS.work_dir, "coordinator-config")
    shutil.rmtree(config_dir, ignore_errors=True)
    # A fixed cluster port, so that the workers find the coordinator again after its restart.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        cluster_port = probe.getsockname()[1]
    coord_argv = [coordinator_bin, "serve", "--listen", "127.0.0.1:0", "--cluster-listen", f"127.0.0.1:{cluster_port}",
                  "--token", TOKEN, "--model", model, "--memory-limit", f"{ARGS.limit_mib}MiB", "--workers", "2",
                  "--threads", "1"]
    coord = Node("coordinator", coord_argv, groups["coord"], env={"POTLUCK_CONFIG_DIR": config_dir})
    url, cluster = http_address(coord), cluster_address(coord)
    time.sleep(2)
    status, body = http(url + "/v1/completions", {"model": "x", "prompt": "Hi", "max_tokens": 1})
    figures["coordinator_before_join"] = {"vmhwm_bytes": coord.status_kib("VmHWM") * 1024,
                                          "vmrss_bytes": coord.status_kib("VmRSS") * 1024,
                                          "api_status": status, "api_error": body.get("error", {}).get("message")}
    print(f"coordinator alone: VmHWM {figures['coordinator_before_join']['vmhwm_bytes'] / MIB:.0f} MiB; "
          f"/v1 answers {status}: {figures['coordinator_before_join']['api_error']}")

    def worker(name, extra=(), cache=None):
        cache = cache or os.path.join(ARGS.work_dir, f"{name}-cache")
        return Node(name, [worker_bin, "join", "--coordinator", cluster, "--token", TOKEN, "--name", name,
                           "--threads", "1", "--listen", "127.0.0.1:0", "--memory-limit", f"{ARGS.limit_mib}MiB",
                           "--identity", os.path.join(ARGS.work_dir, f"{name}.key"), "--cache-dir", cache, *extra],
                    groups[name])

    for name in ("w1", "w2"):
        shutil.rmtree(os.path.join(ARGS.work_dir, f"{name}-cache"), ignore_errors=True)
    workers = {name: worker(name) for name in ("w1", "w2")}
    health = wait_ready(url, 3, 1800)
    figures["join_to_ready_network_s"] = {n: w.wait_line(r"worker: ready", 10)[0] - w.started for n, w in workers.items()}
    figures["plan"] = health["cluster"]["plan"]
    figures["weight_bytes_sent"] = health["cluster"]["weight_bytes_sent"]
    print(health["cluster"]["plan"])
    exactness("check", url, fixture, "3 stages, each node in its cgroup")
    figures["cluster_decode_tokens_per_s"] = decode_rate(url, ARGS.decode_tokens)
    time.sleep(3)  # a heartbeat with the decode's step times
    _, health = http(url + "/health")
    figures["predicted_tokens_per_s"] = health["cluster"]["predicted_tokens_per_s"]
    figures["stages"] = [{k: s.get(k) for k in ("name", "layers", "predicted_ms", "measured_ms", "hop_rtt_ms",
                                                  "weight_bytes", "memory_budget_bytes")} for s in health["stages"]]

    # The worker's own copy of the file: w2 again with an empty cache and --model.
    workers["w2"].stop()
    wait_gone(url, "w2", 120)
    local = worker("w2", ["--model", model], cache=os.path.join(ARGS.work_dir, "w2-empty-cache"))
    local.wait_line(r"reading it from disk", 600)
    health = wait_ready(url, 3, 1800)
    figures["join_to_ready_own_disk_s"] = local.wait_line(r"worker: ready", 10)[0] - local.started
    figures["weight_bytes_sent_after_own_disk"] = health["cluster"]["weight_bytes_sent"]
    workers["w2"] = local
    exactness("check", url, fixture, "3 stages, w2 reading its own file")

    nodes = {"coord": coord, **workers}
    figures["vmhwm_bytes"] = {n: p.status_kib("VmHWM") * 1024 for n, p in nodes.items()}
    figures["cgroups"] = {n: cgroup_figures(g) for n, g in groups.items()}
    first_assignment = join_to_assignment(coord)

    # 5. A coordinator restart on the same file and config: hashes from the store.
    coord.stop()
    coord = Node("coordinator-restart", coord_argv, groups["coord"], env={"POTLUCK_CONFIG_DIR": config_dir})
    coord.wait_line(r"assignment sent", 600)
    restart_assignment = join_to_assignment(coord)
    figures["join_to_first_assignment_s"] = {"first_start": first_assignment, "restart": restart_assignment}
    url = http_address(coord)
    wait_ready(url, 3, 1800)

    # 6. A worker killed by its memory limit is a node loss like any other: w2 again, told it
    # may use --limit-mib but caged at a third of that. The kernel kills it while it loads its
    # slice; the coordinator re-plans, and with two nodes left the model no longer fits: /v1
    # answers 503 saying what is missing.
    workers["w2"].stop()
    wait_gone(url, "w2", 120)
    groups["w2-caged"] = cgroup("w2-caged", limit // 3)
    caged = Node("w2-caged", [worker_bin, "join", "--coordinator", cluster_address(coord), "--token", TOKEN,
                              "--name", "w2-caged", "--threads", "1", "--listen", "127.0.0.1:0",
                              "--memory-limit", f"{ARGS.limit_mib}MiB",
                              "--identity", os.path.join(ARGS.work_dir, "w2-caged.key"),
                              "--cache-dir", os.path.join(ARGS.work_dir, "w2-caged-cache")], groups["w2-caged"])
    caged.proc.wait(timeout=900)
    time.sleep(8)  # failure detection and the re-plan
    status, body = http(url + "/v1/completions", {"model": "x", "prompt": "Hi", "max_tokens": 1})
    figures["caged_worker"] = {"exit": caged.proc.returncode, "oom_kills": cgroup_figures(groups["w2-caged"])["oom_kills"],
                               "api_status": status, "api_error": body.get("error", {}).get("message")}
    print(f"a worker caged at {limit // 3 // MIB} MiB: exit {caged.proc.returncode}; /v1 answers {status}: "
          f"{figures['caged_worker']['api_error']}")
    for node in [coord, *workers.values(), caged]:
        node.stop()
    for g in groups.values():
        os.rmdir(g)

    # The verdicts.
    failures = []
    for n, hwm in figures["vmhwm_bytes"].items():
        if hwm > limit + overhead:
            failures.append(f"{n}: VmHWM {hwm / MIB:.0f} MiB over {ARGS.limit_mib} + {ARGS.overhead_mib} MiB")
    for n, c in figures["cgroups"].items():
        if c["oom_kills"]:
            failures.append(f"{n}: killed by its cgroup {c['oom_kills']} time(s)")
    if figures["caged_worker"]["exit"] != -signal.SIGKILL or figures["caged_worker"]["api_status"] != 503:
        failures.append(f"the caged worker: {figures['caged_worker']}")
    if figures["weight_bytes_sent_after_own_disk"] != figures["weight_bytes_sent"]:
        failures.append("w2 with --model was sent weights")
    print(json.dumps(figures, indent=1))
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(figures, f, indent=1)
    if failures:
        raise SystemExit("FAILED:\n" + "\n".join(failures))
    print("ok: every node within its limit; the cluster's answers are one machine's, bit for bit")


if __name__ == "__main__":
    ARGS = parse_args()
    main()

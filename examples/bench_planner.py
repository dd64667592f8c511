#!/usr/bin/env python3
"""Does the coordinator's plan follow the measured profiles, and does it predict the decode
time it gets? A coordinator (no layers of its own, the optimal planner) and two workers on
loopback, one given less memory than the other; the script prints the plan, then measures
single-stream decode through the API and each stage's time per step (from the workers'
heartbeat counters), beside the plan's predictions.

  cargo build --release -p potluck-coordinator -p potluck-worker
  python3 examples/bench_planner.py [--small 100MiB] [--large 120MiB] [--requests 5]

With the defaults neither worker can hold the model (182 MiB with the KV cache of 16
sequences × 256 tokens), so the plan must split it by what each can hold; with
`--large 4GiB` the planner should leave the small worker out (one stage is faster).

The plan is made for `--ctx-size` tokens of context (the KV read at full context is part of
the prediction: the plan must hold at the end of a long answer); the requests here stay
below it, so the comparison uses a context (256) the requests nearly fill.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import BIN, Proc, decode_rate, get  # noqa: E402

TOKEN = "bench-token-0123456789"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", default="100MiB", help="memory limit of the first worker")
    ap.add_argument("--large", default="120MiB", help="memory limit of the second worker")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--ctx-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model")
    args = ap.parse_args()
    model = args.model or subprocess.check_output([os.path.join(BIN, "coordinator"), "fetch-model"], text=True).strip()
    work = tempfile.mkdtemp(prefix="potluck-bench-planner-")
    common = ["--threads", str(args.threads)]
    coordinator = Proc("coordinator", [
        os.path.join(BIN, "coordinator"), "serve", "--listen", "127.0.0.1:0", "--model", model,
        "--cluster-listen", "127.0.0.1:0", "--token", TOKEN, "--workers", "2", "--no-local-layers",
        "--planner", "optimal", "--ctx-size", str(args.ctx_size)] + common,
        {"POTLUCK_CONFIG_DIR": os.path.join(work, "cfg")})
    procs = [coordinator]
    try:
        base = "http://" + coordinator.wait_line(r" on http://(\S+)").group(1)
        cluster = coordinator.wait_line(r"cluster endpoint on (\S+)").group(1)
        for name, limit in (("small", args.small), ("large", args.large)):
            procs.append(Proc(name, [os.path.join(BIN, "worker"), "join", "--coordinator", cluster, "--token", TOKEN,
                                     "--listen", "127.0.0.1:0", "--memory-limit", limit, "--name", name,
                                     "--identity", os.path.join(work, f"{name}.key"),
                                     "--cache-dir", os.path.join(work, f"cache-{name}")] + common))
        coordinator.wait_line(r"cluster ready", timeout=300)
        health = get(base + "/health")
        print(health["cluster"]["plan"])
        decode_rate(base, "Warm up", 16)
        before = {n["name"]: n for n in get(base + "/health")["nodes"]}
        rates = [decode_rate(base, "The capital of France is", args.tokens) for _ in range(args.requests)]
        time.sleep(2.5)  # a heartbeat after the last step
        after = {n["name"]: n for n in get(base + "/health")["nodes"]}
    finally:
        for p in procs:
            p.stop()
    stages = health["stages"]
    measured_token_ms = 1000 / statistics.median(rates)
    predicted_token_ms = 1000 / health["cluster"]["predicted_tokens_per_s"]
    print(f"{'stage':<8} {'layers':<9} {'predicted ms':>12} {'measured ms':>12}")
    for s in stages:
        name = s["name"]
        steps = after[name]["steps"] - before[name]["steps"]
        busy = after[name]["busy_us"] - before[name]["busy_us"]
        measured = busy / steps / 1000 if steps else float("nan")
        print(f"{name:<8} {s['layers'][0]:>3}..{s['layers'][1]:<4} {s['predicted_ms']:12.2f} {measured:12.2f}")
    hops = sum(s["predicted_hop_ms"] or 0 for s in stages)
    print(f"{'hops':<18} {hops:12.2f}")
    error = (predicted_token_ms - measured_token_ms) / measured_token_ms
    print(f"token: predicted {predicted_token_ms:.2f} ms ({1000 / predicted_token_ms:.1f} tok/s), "
          f"measured {measured_token_ms:.2f} ms ({statistics.median(rates):.1f} tok/s, median of {args.requests}): "
          f"prediction {error:+.0%}")


if __name__ == "__main__":
    main()

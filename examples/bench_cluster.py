#!/usr/bin/env python3
"""Single-stream decode tokens/s through the whole product (HTTP API, scheduler, QUIC hops),
with the model on 1, 2 and 3 stages on loopback, measured in the same run and interleaved
(1, 2, 3, 1, 2, 3, ...) so a noisy machine hurts every configuration alike. Also reports how
fast the coordinator delivered the slices (MB/s) and the planner's predicted tokens/s.

  cargo build --release -p potluck-coordinator -p potluck-worker
  python3 examples/bench_cluster.py [--rounds 3] [--tokens 128] [--threads 1] [--dtype f16]

1 stage is `coordinator serve --no-cluster`; 2 stages are the coordinator (stage 0) and one
worker; 3 stages the coordinator and two workers. Every process computes with --threads
threads; layers are split in proportion to memory (equal budgets: even splits) so the
configurations are the same on every machine. Decode tokens/s = (tokens - 1) / (time of the
last streamed token - time of the first), median over requests, then over rounds.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("POTLUCK_BIN_DIR", os.path.join(ROOT, "target", "release"))
TOKEN = "bench-token-0123456789"


class Proc:
    def __init__(self, name, args, env=None):
        self.name, self.lines = name, []
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **(env or {})})
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        sys.exit(f"{self.name}: no line matching {pattern!r}:\n" + "\n".join(self.lines[-30:]))

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def decode_rate(base, prompt, n):
    body = json.dumps({"model": "x", "prompt": prompt, "max_tokens": n, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    stamps = []
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                stamps.append(time.monotonic())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run_config(stages, args, work):
    tmp = tempfile.mkdtemp(dir=work)
    common = ["--threads", str(args.threads)]
    cmd = [os.path.join(BIN, "coordinator"), "serve", "--listen", "127.0.0.1:0", "--model", args.model] + common
    if stages == 1:
        cmd += ["--no-cluster"]
    else:
        cmd += ["--cluster-listen", "127.0.0.1:0", "--token", TOKEN, "--workers", str(stages - 1),
                "--planner", "proportional", "--memory-limit", "4GiB", "--activation-dtype", args.dtype]
    procs = [Proc("coordinator", cmd, {"POTLUCK_CONFIG_DIR": os.path.join(tmp, "cfg")})]
    try:
        base = "http://" + procs[0].wait_line(r" on http://(\S+)").group(1)
        slice_rates = []
        if stages > 1:
            cluster = procs[0].wait_line(r"cluster endpoint on (\S+)").group(1)
            for i in range(stages - 1):
                procs.append(Proc(f"w{i}", [os.path.join(BIN, "worker"), "join", "--coordinator", cluster,
                                            "--token", TOKEN, "--listen", "127.0.0.1:0", "--memory-limit", "4GiB",
                                            "--identity", os.path.join(tmp, f"w{i}.key"),
                                            "--cache-dir", os.path.join(tmp, f"cache{i}")] + common))
            for w in procs[1:]:
                m = w.wait_line(r"slice ready in ([\d.]+) s: [\d.]+ MiB from the cache, ([\d.]+) MiB received")
                slice_rates.append(float(m.group(2)) * 1.048576 / float(m.group(1)))
            deadline = time.time() + 120
            while len(get(base + "/health")["stages"]) != stages or any(
                    s["node_id"] == "coordinator" for s in get(base + "/health")["stages"][1:]):
                if time.time() > deadline:
                    sys.exit(f"{stages} stages never became active: {get(base + '/health')}")
                time.sleep(0.1)
        health = get(base + "/health")
        decode_rate(base, "Warm up", 8)
        rates = [decode_rate(base, "The capital of France is", args.tokens) for _ in range(args.requests)]
        return {"decode": statistics.median(rates), "slice_mb_s": slice_rates,
                "predicted": health["cluster"].get("predicted_tokens_per_s"),
                "layers": [s["layers"] for s in health["stages"]]}
    finally:
        for p in procs:
            p.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--model")
    args = ap.parse_args()
    if not args.model:
        args.model = subprocess.check_output([os.path.join(BIN, "coordinator"), "fetch-model"], text=True).strip()
    work = tempfile.mkdtemp(prefix="potluck-bench-cluster-")
    results = {1: [], 2: [], 3: []}
    try:
        for r in range(args.rounds):
            for stages in (1, 2, 3):
                res = run_config(stages, args, work)
                results[stages].append(res)
                print(f"round {r + 1} stages {stages}: decode {res['decode']:.1f} tok/s layers {res['layers']}"
                      f" slice MB/s {[round(x) for x in res['slice_mb_s']]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(r["decode"] for r in results[1])
    print(f"threads per process: {args.threads}, activations: {args.dtype}, {args.tokens} tokens/request, "
          f"{args.requests} requests × {args.rounds} rounds")
    print(f"{'stages':>6} {'decode tok/s':>13} {'vs 1 stage':>11} {'predicted tok/s':>16} {'slice MB/s':>11}  layers")
    for stages in (1, 2, 3):
        rows = results[stages]
        decode = statistics.median(r["decode"] for r in rows)
        predicted = [r["predicted"] for r in rows if r["predicted"]]
        slices = [x for r in rows for x in r["slice_mb_s"]]
        print(f"{stages:>6} {decode:13.1f} {decode / base:10.2f}x "
              f"{(statistics.median(predicted) if predicted else float('nan')):16.1f} "
              f"{(statistics.median(slices) if slices else float('nan')):11.0f}  {rows[-1]['layers']}")


if __name__ == "__main__":
    main()

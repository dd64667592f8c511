#!/usr/bin/env python3
"""Aggregate throughput with many requests at once: generated tokens/s and time to first
token at concurrency 1, 4 and 16, for the model on 1 stage and on 2 stages, with the same
total threads, measured in the same run.

  cargo build --release -p potluck-coordinator -p potluck-worker
  python3 examples/bench_concurrency.py [--rounds 2] [--tokens 64] [--threads 2] [--plot docs/concurrency.png]
                                        [--llamacpp]

1 stage: `coordinator serve --no-cluster --threads T`. 2 stages: the coordinator (stage 0,
T/2 threads) and one worker (T/2 threads), layers split evenly. Both run side by side (an
idle one costs nothing) and the measurements alternate between them, level by level and
round by round, so a noisy machine hurts both alike. At concurrency c, c clients each send
--requests-per-client streaming completions (--tokens tokens each, ignore_eos, distinct
prompts) back to back; aggregate tokens/s = all tokens / wall time of the level; TTFT is
each request's time from sending to its first token. The table gives medians over rounds;
--plot writes tokens/s against concurrency as a PNG (needs matplotlib). --llamacpp then runs
examples/bench_vs_llamacpp.sh at the same threads: the single-machine engine's prefill and
decode against llama.cpp's, in the same run.
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import BIN, TOKEN, Proc, get  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn",
           "In 1969, the first", "Water boils at", "My favourite colour is", "The quick brown fox",
           "The largest planet is", "To make bread you need", "Python is a", "The ocean is",
           "Mount Everest is", "A good friend", "The speed of light", "Rivers flow"]


def start(stages, threads, model, work):
    tmp = tempfile.mkdtemp(dir=work)
    env = {"POTLUCK_CONFIG_DIR": os.path.join(tmp, "cfg")}
    cmd = [os.path.join(BIN, "coordinator"), "serve", "--listen", "127.0.0.1:0", "--model", model]
    if stages == 1:
        procs = [Proc("coordinator (1 stage)", cmd + ["--no-cluster", "--threads", str(threads)], env)]
        return "http://" + procs[0].wait_line(r" on http://(\S+)").group(1), procs
    per = str(max(1, threads // 2))
    cmd += ["--threads", per, "--cluster-listen", "127.0.0.1:0", "--token", TOKEN, "--workers", "1",
            "--planner", "throughput", "--memory-limit", "4GiB"]
    procs = [Proc("coordinator (2 stages)", cmd, env)]
    base = "http://" + procs[0].wait_line(r" on http://(\S+)").group(1)
    cluster = procs[0].wait_line(r"cluster endpoint on (\S+)").group(1)
    procs.append(Proc("worker", [os.path.join(BIN, "worker"), "join", "--coordinator", cluster, "--token", TOKEN,
                                 "--listen", "127.0.0.1:0", "--memory-limit", "4GiB", "--threads", per,
                                 "--identity", os.path.join(tmp, "w.key"), "--cache-dir", os.path.join(tmp, "cache")]))
    deadline = time.time() + 180
    while True:
        stages_now = get(base + "/health")["stages"]
        if len(stages_now) == 2 and all(s["node_id"] != "coordinator" for s in stages_now[1:]):
            break
        if time.time() > deadline:
            sys.exit(f"2 stages never became active: {get(base + '/health')}")
        time.sleep(0.1)
    print("2 stages: " + ", ".join(f"{s['name']} layers {s['layers'][0]}-{s['layers'][1]}" for s in stages_now),
          file=sys.stderr)
    return base, procs


def one_request(base, prompt, tokens):
    """(tokens received, seconds to the first token)."""
    body = json.dumps({"model": "x", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    sent, first, n = time.perf_counter(), None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                n += 1
                first = first or time.perf_counter()
    return n, (first or time.perf_counter()) - sent


def level(base, concurrency, tokens, per_client):
    """Aggregate tokens/s and the TTFTs of one concurrency level."""
    def client(i):
        out = []
        for k in range(per_client):
            out.append(one_request(base, PROMPTS[(i + k) % len(PROMPTS)] + f" ({i}.{k})", tokens))
        return out
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, range(concurrency)) for r in rs]
    wall = time.perf_counter() - started
    return sum(n for n, _ in results) / wall, [t for _, t in results]


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="total compute threads of each configuration")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--plot")
    ap.add_argument("--json")
    ap.add_argument("--model")
    ap.add_argument("--llamacpp", action="store_true", help="also compare the engine with llama.cpp")
    args = ap.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    if not args.model:
        args.model = subprocess.check_output([os.path.join(BIN, "coordinator"), "fetch-model"], text=True).strip()
    work = tempfile.mkdtemp(prefix="potluck-bench-concurrency-")
    procs, bases = [], {}
    tps = {(s, c): [] for s in (1, 2) for c in levels}
    ttft = {(s, c): [] for s in (1, 2) for c in levels}
    try:
        for stages in (1, 2):
            bases[stages], p = start(stages, args.threads, args.model, work)
            procs += p
            one_request(bases[stages], "Warm up", 8)
        for r in range(args.rounds):
            for c in levels:
                for stages in (1, 2):
                    rate, firsts = level(bases[stages], c, args.tokens, args.requests_per_client)
                    tps[(stages, c)].append(rate)
                    ttft[(stages, c)] += firsts
                    print(f"round {r + 1}, {stages} stage(s), concurrency {c}: {rate:.1f} tok/s", file=sys.stderr)
    finally:
        for p in procs:
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(f"{args.threads} threads per configuration, {args.tokens} tokens/request, "
          f"{args.requests_per_client} requests/client, {args.rounds} rounds")
    print(f"{'stages':>6} {'concurrency':>11} {'tok/s':>8} {'vs c=1':>7} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12}")
    for stages in (1, 2):
        for c in levels:
            print(f"{stages:>6} {c:>11} {med[(stages, c)]:8.1f} {med[(stages, c)] / med[(stages, levels[0])]:6.2f}x "
                  f"{pct(ttft[(stages, c)], 50) * 1000:12.0f} {pct(ttft[(stages, c)], 95) * 1000:12.0f}")
    top = levels[-1]
    print(f"bars: 2 stages c={top} / 2 stages c={levels[0]} = {med[(2, top)] / med[(2, levels[0])]:.2f}x (≥ 1.6), "
          f"2 stages c={top} / 1 stage c={top} = {med[(2, top)] / med[(1, top)]:.2f}x (≥ 1.0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"levels": levels, "tps": {f"{s}x{c}": v for (s, c), v in tps.items()},
                       "ttft": {f"{s}x{c}": v for (s, c), v in ttft.items()}}, f)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        for stages, style in ((1, "o-"), (2, "s-")):
            ax.plot(levels, [med[(stages, c)] for c in levels], style,
                    label=f"{stages} stage{'s' if stages > 1 else ''} ({args.threads} threads in all)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streaming requests")
        ax.set_ylabel("generated tokens/s (all requests)")
        ax.set_title("SmolLM2-135M Q4_1 on loopback, this machine")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")
    if args.llamacpp:
        sys.stdout.flush()
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_vs_llamacpp.sh")
        subprocess.run(["bash", script, "--threads", str(args.threads), "--rounds", "3", "--model", args.model], check=True)


if __name__ == "__main__":
    main()

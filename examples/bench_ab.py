#!/usr/bin/env python3
"""Old build against new build, alternating, with an A/A pair to show the noise.

Each iteration runs three arms in a rotating order: `old`, `new`, and `old` again (`old'`,
the A/A arm: the same binaries as `old`, so its ratio to `old` is pure noise). Every arm runs
  * engine-bench (one machine, no network): prefill and decode tokens/s, and
  * examples/bench_cluster.py with that arm's binaries: decode tokens/s through the whole
    product on 1, 2 and 3 stages on loopback.
Per iteration it takes the ratios new/old and old'/old of every figure; the table gives
their medians and ranges. A change is "speed unchanged" when the median new/old is at least
0.97 and inside the range the A/A ratios span.

Achieved memory bandwidth is printed beside decode: decode tokens/s × the bytes one token
reads (every layer's weights plus the output head; for a tied head, the embedding matrix).

  cargo build --release --workspace --bins --examples          # in both trees
  python3 examples/bench_ab.py --old ../old/target/release --new target/release \
      --model ~/.cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf --iterations 6
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engine_bench(bin_dir, model, threads):
    out = subprocess.run([os.path.join(bin_dir, "engine-bench"), "--model", model, "--threads", str(threads),
                          "--prompt-tokens", "128", "--gen-tokens", "64", "--reps", "3"],
                         capture_output=True, text=True, check=True).stdout
    summary = json.loads([l for l in out.splitlines() if '"engine"' in l][-1])
    return {"engine prefill": summary["prefill_tok_s"], "engine decode": summary["decode_tok_s"]}


def cluster_bench(bin_dir, model, threads, rounds, tokens, dtype):
    env = {**os.environ, "POTLUCK_BIN_DIR": bin_dir}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "bench_cluster.py"), "--model", model,
                          "--rounds", str(rounds), "--tokens", str(tokens), "--threads", str(threads),
                          "--dtype", dtype],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"bench_cluster.py failed with {bin_dir}:\n{out.stdout}\n{out.stderr}")
    figures = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s*([123])\s+([\d.]+)\s", line)
        if m:
            figures[f"cluster {m.group(1)} stage decode"] = float(m.group(2))
    if len(figures) != 3:
        sys.exit(f"cannot read bench_cluster.py's table:\n{out.stdout}")
    return figures


def bytes_per_token(model):
    """Weight bytes one decoded token reads, from the GGUF header (via the shard-planner CLI
    would need a build; the file's tensor sizes are read directly here)."""
    try:
        import gguf  # the PyPI `gguf` package, if present
    except ImportError:
        return None
    reader = gguf.GGUFReader(model)
    total = 0
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        if t.name.startswith("blk.") or t.name in ("output.weight", "output_norm.weight"):
            total += int(t.n_bytes)
        elif t.name == "token_embd.weight" and "output.weight" not in names:
            total += int(t.n_bytes)  # the tied head reads the whole embedding matrix
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="directory with the old build's binaries")
    ap.add_argument("--new", required=True, help="directory with the new build's binaries")
    ap.add_argument("--model", required=True)
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="bench_cluster.py rounds per arm")
    ap.add_argument("--tokens", type=int, default=64, help="bench_cluster.py tokens per request")
    ap.add_argument("--dtype", default="f32", help="activations between stages (both builds must accept it)")
    args = ap.parse_args()
    arms = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new), "old'": os.path.abspath(args.old)}
    order = list(arms)
    results = {arm: [] for arm in arms}
    for it in range(args.iterations):
        rotated = order[it % 3:] + order[:it % 3]
        for arm in rotated:
            figures = engine_bench(arms[arm], args.model, args.threads)
            figures.update(cluster_bench(arms[arm], args.model, args.threads, args.rounds, args.tokens, args.dtype))
            results[arm].append(figures)
            print(f"iteration {it + 1} {arm:4}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()),
                  file=sys.stderr, flush=True)

    per_token = bytes_per_token(args.model)
    print(f"\n{args.iterations} iterations, arms in rotating order, {args.threads} thread(s) per process")
    print(f"{'figure (tok/s)':28} {'old':>8} {'new':>8} {'new/old median':>15} {'new/old range':>15} "
          f"{'A/A median':>11} {'A/A range':>13}")
    for key in results["old"][0]:
        med = {arm: statistics.median(r[key] for r in results[arm]) for arm in arms}
        ab = [n[key] / o[key] for n, o in zip(results["new"], results["old"])]
        aa = [a[key] / o[key] for a, o in zip(results["old'"], results["old"])]
        print(f"{key:28} {med['old']:8.1f} {med['new']:8.1f} {statistics.median(ab):15.3f} "
              f"{min(ab):7.3f}–{max(ab):.3f} {statistics.median(aa):11.3f} {min(aa):6.3f}–{max(aa):.3f}")
        print("    new/old per iteration: " + " ".join(f"{r:.3f}" for r in ab)
              + "   A/A: " + " ".join(f"{r:.3f}" for r in aa))
    if per_token:
        for arm in ("old", "new"):
            decode = statistics.median(r["engine decode"] for r in results[arm])
            print(f"engine decode, {arm}: {decode:.1f} tok/s × {per_token / 1e6:.1f} MB/token = "
                  f"{decode * per_token / 1e9:.2f} GB/s of weights read")


if __name__ == "__main__":
    main()

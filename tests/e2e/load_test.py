#!/usr/bin/env python3
"""A bounded load test: N concurrent streaming clients for D seconds against a running
coordinator (with or without workers), checking that every request succeeds, every stream
ends with `data: [DONE]`, and the processes' memory stays flat after a warm-up.

  load_test.py BASE_URL [--clients 64] [--seconds 120] [--warmup 30] [--pid NAME=PID ...]

Each client loops until the time is up: a streaming chat or completion (alternating), with
its own prompt and 4 to 40 tokens, through the raw HTTP API (urllib, so the client library
cannot hide a malformed stream). Memory is the resident set (VmRSS) of each --pid, sampled
every 2 s; "flat" means the median of the last five samples is within 5% + 8 MiB of the
median of the first five samples after the warm-up. Prints a summary; exits 1 on any
failure.
"""
import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request

WORDS = ["river", "lantern", "orbit", "maple", "copper", "harbor", "meadow", "signal", "glacier", "violet",
         "canyon", "ember", "willow", "prism", "tundra", "falcon"]


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stream(base, i, k):
    """One streaming request; returns (ok, reason, tokens)."""
    n_tokens = 4 + (i * 7 + k * 3) % 37
    topic = f"{WORDS[i % len(WORDS)]} {WORDS[(i + k) % len(WORDS)]}"
    if (i + k) % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Write about a {topic}."}]}
    else:
        path, body = "/v1/completions", {"prompt": f"A story about a {topic}:"}
    body.update({"model": "x", "max_tokens": n_tokens, "temperature": 0.7, "seed": i * 1000 + k, "stream": True})
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            if r.status != 200:
                return False, f"status {r.status}", 0
            tokens, done = 0, False
            for raw in r:
                line = raw.decode().strip()
                if not line or line.startswith(":"):
                    continue  # blank separators, and SSE comments (keep-alives while queued)
                if not line.startswith("data: "):
                    return False, f"not an SSE data line: {line[:80]!r}", tokens
                if line == "data: [DONE]":
                    done = True
                    continue
                if done:
                    return False, "data after [DONE]", tokens
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return False, f"error chunk: {chunk['error']}", tokens
                tokens += 1
            return (True, "", tokens) if done else (False, "stream ended without [DONE]", tokens)
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}: {e.read()[:200]!r}", 0
    except Exception as e:  # noqa: BLE001 - any failure of a request is a failed request
        return False, f"{type(e).__name__}: {e}", 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--pid", action="append", default=[], help="NAME=PID of a process whose memory must stay flat")
    args = ap.parse_args()
    pids = dict(p.split("=", 1) for p in args.pid)
    stop_at = time.time() + args.seconds
    lock = threading.Lock()
    done, failures, chunks = [0], [], [0]

    def client(i):
        k = 0
        while time.time() < stop_at:
            ok, reason, n = stream(args.base, i, k)
            with lock:
                if ok:
                    done[0] += 1
                    chunks[0] += n
                else:
                    failures.append(f"client {i} request {k}: {reason}")
            k += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    started = time.time()
    for t in threads:
        t.start()
    samples = {name: [] for name in pids}  # (seconds since start, bytes)
    while any(t.is_alive() for t in threads):
        now = time.time() - started
        for name, pid in pids.items():
            samples[name].append((now, rss_bytes(pid)))
        time.sleep(2)
    for t in threads:
        t.join()
    wall = time.time() - started
    print(f"{args.clients} clients, {wall:.0f} s: {done[0]} requests completed, {len(failures)} failed, "
          f"{chunks[0]} chunks streamed ({chunks[0] / wall:.1f}/s)")
    ok = True
    if failures:
        ok = False
        print("FAILED: requests failed:\n  " + "\n  ".join(failures[:20]), file=sys.stderr)
    if done[0] < args.clients:
        ok = False
        print(f"FAILED: only {done[0]} requests completed", file=sys.stderr)
    for name, points in samples.items():
        after = [b for t, b in points if t >= args.warmup]
        if len(after) < 10:
            ok = False
            print(f"FAILED: too few memory samples of {name} after the warm-up", file=sys.stderr)
            continue
        first, last = statistics.median(after[:5]), statistics.median(after[-5:])
        limit = first * 1.05 + 8 * 2**20
        mib = lambda b: b / 2**20  # noqa: E731
        print(f"{name}: RSS after warm-up {mib(first):.1f} MiB, at the end {mib(last):.1f} MiB, "
              f"peak {mib(max(after)):.1f} MiB (limit {mib(limit):.1f} MiB); every 10 s: "
              + " ".join(f"{mib(b):.0f}" for t, b in points[::5]))
        if last > limit:
            ok = False
            print(f"FAILED: {name}'s memory grew from {mib(first):.1f} to {mib(last):.1f} MiB", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
